//! The results store: every finished run indexed in one SQLite file, so results accumulate
//! over time and a drift in accuracy or energy shows up as a trend (the continuous monitoring
//! the study asks for).
//!
//! Indexing the same run directory again replaces its rows (a resumed or re-reported run is
//! still one run), keyed by the directory's absolute path.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::comparison::Comparison;
use crate::rundir::RunDir;
use crate::ReportError;

/// `$MICA_STORE`, else `~/.local/share/mica/runs.sqlite` (XDG_DATA_HOME respected).
pub fn default_store_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MICA_STORE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(d).join("mica").join("runs.sqlite"));
    }
    std::env::var_os("HOME")
        .filter(|p| !p.is_empty())
        .map(|h| PathBuf::from(h).join(".local/share/mica/runs.sqlite"))
}

#[derive(Debug, Clone, Serialize)]
pub struct StoredRun {
    pub id: i64,
    pub name: String,
    pub run_dir: String,
    pub created_unix: Option<i64>,
    pub indexed_unix: i64,
    pub dataset: Option<String>,
    pub split_hash: Option<String>,
    pub simulated: bool,
    pub classifiers: usize,
    pub best_classifier: Option<String>,
    pub best_accuracy: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoredResult {
    pub classifier: String,
    pub slug: String,
    pub images: i64,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub weighted_f1: f64,
    pub coverage: Option<f64>,
    pub accepted_accuracy: Option<f64>,
    pub no_answer_share: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p90_ms: Option<f64>,
    pub images_per_s: Option<f64>,
    pub wh_per_1000: Option<f64>,
    pub gco2e_per_1000: Option<f64>,
    pub energy_method: Option<String>,
    pub usd_per_1000: Option<f64>,
    pub simulated: bool,
}

pub struct Store {
    pub(crate) path: PathBuf,
    pub(crate) conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    run_dir TEXT NOT NULL UNIQUE,
    created_unix INTEGER,
    indexed_unix INTEGER NOT NULL,
    dataset TEXT,
    split_hash TEXT,
    simulated INTEGER NOT NULL,
    report_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    classifier TEXT NOT NULL,
    slug TEXT NOT NULL,
    images INTEGER NOT NULL,
    accuracy REAL NOT NULL,
    macro_f1 REAL NOT NULL,
    weighted_f1 REAL NOT NULL,
    coverage REAL,
    accepted_accuracy REAL,
    no_answer_share REAL NOT NULL,
    latency_p50_ms REAL,
    latency_p90_ms REAL,
    images_per_s REAL,
    wh_per_1000 REAL,
    gco2e_per_1000 REAL,
    energy_method TEXT,
    usd_per_1000 REAL,
    simulated INTEGER NOT NULL,
    PRIMARY KEY (run_id, slug)
);
CREATE INDEX IF NOT EXISTS results_classifier ON results(classifier);
";

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, ReportError> {
        let path = path.as_ref().to_path_buf();
        let err = |m: String| ReportError::Store {
            path: path.clone(),
            message: m,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(&path).map_err(|e| err(e.to_string()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| err(e.to_string()))?;
        // WAL: readers (the dashboard, `mica runs`, `mica audit`) never block the server's
        // writes and a crash mid-write cannot leave a half-applied transaction. FULL rather than
        // NORMAL: in WAL mode NORMAL may lose the last committed transactions on power loss, and
        // a physician's decision that the page said was recorded must survive that; decisions
        // are a handful a minute, so the extra fsync per commit costs nothing measurable. A
        // filesystem without shared memory (some network mounts) answers with another mode;
        // the store still works there, only without WAL's concurrency.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| err(format!("not a mica results store ({e})")))?;
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .and_then(|_| conn.execute_batch(SCHEMA))
            .and_then(|_| conn.execute_batch(crate::cases::SCHEMA))
            .map_err(|e| err(format!("not a mica results store ({e})")))?;
        crate::cases::migrate(&mut conn).map_err(|e| err(format!("cannot migrate the case tables ({e})")))?;
        Ok(Store { path, conn })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn err(&self, e: impl std::fmt::Display) -> ReportError {
        ReportError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Indexes (or re-indexes) a run; returns its id.
    pub fn index(&mut self, run: &RunDir, cmp: &Comparison) -> Result<i64, ReportError> {
        let dir = run
            .root
            .canonicalize()
            .unwrap_or_else(|_| run.root.clone())
            .display()
            .to_string();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let json = serde_json::to_string(cmp).expect("comparison serialises");
        let tx = self.conn.transaction().map_err(|e| ReportError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        let existing: Option<i64> = tx
            .query_row("SELECT id FROM runs WHERE run_dir = ?1", params![dir], |r| r.get(0))
            .optional()
            .map_err(|e| ReportError::Store {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        let path = self.path.clone();
        let e = move |e: rusqlite::Error| ReportError::Store {
            path: path.clone(),
            message: e.to_string(),
        };
        let id = match existing {
            Some(id) => {
                tx.execute("DELETE FROM results WHERE run_id = ?1", params![id]).map_err(&e)?;
                tx.execute(
                    "UPDATE runs SET name=?2, created_unix=?3, indexed_unix=?4, dataset=?5, split_hash=?6, simulated=?7, report_json=?8 WHERE id=?1",
                    params![
                        id,
                        cmp.run,
                        cmp.provenance.created_unix.map(|v| v as i64),
                        now,
                        cmp.provenance.dataset,
                        cmp.provenance.split_hash,
                        cmp.simulated,
                        json
                    ],
                )
                .map_err(&e)?;
                id
            }
            None => {
                tx.execute(
                    "INSERT INTO runs (name, run_dir, created_unix, indexed_unix, dataset, split_hash, simulated, report_json) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
                    params![
                        cmp.run,
                        dir,
                        cmp.provenance.created_unix.map(|v| v as i64),
                        now,
                        cmp.provenance.dataset,
                        cmp.provenance.split_hash,
                        cmp.simulated,
                        json
                    ],
                )
                .map_err(&e)?;
                tx.last_insert_rowid()
            }
        };
        for (i, r) in cmp.headline.iter().enumerate() {
            tx.execute(
                "INSERT INTO results (run_id, position, classifier, slug, images, accuracy, macro_f1, weighted_f1, coverage, accepted_accuracy, no_answer_share, latency_p50_ms, latency_p90_ms, images_per_s, wh_per_1000, gco2e_per_1000, energy_method, usd_per_1000, simulated) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19)",
                params![
                    id,
                    i as i64,
                    r.classifier,
                    r.slug,
                    r.images as i64,
                    r.accuracy,
                    r.macro_f1,
                    r.weighted_f1,
                    r.coverage,
                    r.accepted_accuracy,
                    r.no_answer_share,
                    r.latency_p50_ms,
                    r.latency_p90_ms,
                    r.images_per_s,
                    r.wh_per_1000,
                    r.gco2e_per_1000,
                    r.energy_method,
                    r.usd_per_1000,
                    r.simulated
                ],
            )
            .map_err(&e)?;
        }
        tx.commit().map_err(&e)?;
        Ok(id)
    }

    /// Every run, newest first.
    pub fn list(&self) -> Result<Vec<StoredRun>, ReportError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT r.id, r.name, r.run_dir, r.created_unix, r.indexed_unix, r.dataset, r.split_hash, r.simulated,
                        (SELECT COUNT(*) FROM results x WHERE x.run_id = r.id),
                        (SELECT classifier FROM results x WHERE x.run_id = r.id ORDER BY accuracy DESC, position LIMIT 1),
                        (SELECT MAX(accuracy) FROM results x WHERE x.run_id = r.id)
                 FROM runs r ORDER BY r.indexed_unix DESC, r.id DESC",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(StoredRun {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    run_dir: r.get(2)?,
                    created_unix: r.get(3)?,
                    indexed_unix: r.get(4)?,
                    dataset: r.get(5)?,
                    split_hash: r.get(6)?,
                    simulated: r.get(7)?,
                    classifiers: r.get::<_, i64>(8)? as usize,
                    best_classifier: r.get(9)?,
                    best_accuracy: r.get(10)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// One run by numeric id, or by name (the most recently indexed run of that name).
    pub fn find(&self, key: &str) -> Result<Option<StoredRun>, ReportError> {
        let all = self.list()?;
        if let Ok(id) = key.parse::<i64>() {
            if let Some(r) = all.iter().find(|r| r.id == id) {
                return Ok(Some(r.clone()));
            }
        }
        Ok(all.into_iter().find(|r| r.name == key))
    }

    pub fn results(&self, run_id: i64) -> Result<Vec<StoredResult>, ReportError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT classifier, slug, images, accuracy, macro_f1, weighted_f1, coverage, accepted_accuracy, no_answer_share,
                        latency_p50_ms, latency_p90_ms, images_per_s, wh_per_1000, gco2e_per_1000, energy_method, usd_per_1000, simulated
                 FROM results WHERE run_id = ?1 ORDER BY position",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![run_id], |r| {
                Ok(StoredResult {
                    classifier: r.get(0)?,
                    slug: r.get(1)?,
                    images: r.get(2)?,
                    accuracy: r.get(3)?,
                    macro_f1: r.get(4)?,
                    weighted_f1: r.get(5)?,
                    coverage: r.get(6)?,
                    accepted_accuracy: r.get(7)?,
                    no_answer_share: r.get(8)?,
                    latency_p50_ms: r.get(9)?,
                    latency_p90_ms: r.get(10)?,
                    images_per_s: r.get(11)?,
                    wh_per_1000: r.get(12)?,
                    gco2e_per_1000: r.get(13)?,
                    energy_method: r.get(14)?,
                    usd_per_1000: r.get(15)?,
                    simulated: r.get(16)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// The stored `Comparison` JSON of a run (everything the report showed at indexing time).
    pub fn report_json(&self, run_id: i64) -> Result<Option<serde_json::Value>, ReportError> {
        let s: Option<String> = self
            .conn
            .query_row("SELECT report_json FROM runs WHERE id = ?1", params![run_id], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(s.and_then(|s| serde_json::from_str(&s).ok()))
    }
}
