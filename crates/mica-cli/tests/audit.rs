//! `mica audit verify|export` on stores written through the library the way `mica serve`
//! writes them, then tampered with through a raw SQLite connection the way anyone holding the
//! file could.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use mica_report::cases::{audit, AuditEntry, AuthMethod, CasePrediction, CaseRecord, NewDecision};
use mica_report::Store;
use predicates::prelude::*;

fn mica() -> Command {
    let mut c = Command::cargo_bin("mica").unwrap();
    // Never the user's own store.
    c.env_remove("MICA_STORE");
    c
}

fn pred(classifier: &str, label: &str, resolved: Option<&str>) -> CasePrediction {
    CasePrediction {
        classifier: classifier.into(),
        family: if classifier.starts_with("llm") { "llm" } else { "cnn" }.into(),
        model_version: classifier.trim_start_matches("llm:").into(),
        outcome: "answered".into(),
        suggested_label: Some(label.into()),
        confidence: Some(0.9),
        probabilities: None,
        latency_ms: 2.5,
        energy_wh: None,
        energy_method: "not-measured:remote-api".into(),
        rationale: Some("a, \"quoted\"\nrationale".into()),
        error: None,
        simulated: false,
        tokens: None,
        cost_usd: None,
        has_gradcam: false,
        resolved_model: resolved.map(String::from),
        system_fingerprint: resolved.map(|_| "fp_1".to_string()),
        model_digest: None,
        cascade: None,
    }
}

fn case(id: &str, preds: Vec<CasePrediction>) -> CaseRecord {
    CaseRecord {
        id: id.into(),
        created_unix: 1_760_000_000,
        image_sha256: "cd".repeat(32),
        image_format: "png".into(),
        width: 8,
        height: 8,
        frames: 1,
        deidentified: vec![],
        labels: vec!["normal".into(), "pneumonia".into()],
        review_threshold: 0.7,
        needs_review: false,
        review_reasons: vec![],
        predictions: preds,
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    store: PathBuf,
}

/// Two cases, two decisions by two named users.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store/runs.sqlite");
    let mut st = Store::open(&store).unwrap();
    st.insert_case(&case(
        "case-1",
        vec![
            pred("cnn:small", "normal", None),
            pred("llm:openai/gpt-4o", "pneumonia", Some("gpt-4o-2024-08-06")),
        ],
    ))
    .unwrap();
    st.insert_case(&case("case-2", vec![pred("cnn:small", "pneumonia", None)]))
        .unwrap();
    for (case_id, user, label) in [("case-1", "alice", "normal"), ("case-2", "bob", "pneumonia")] {
        st.record_decision(&NewDecision {
            case_id,
            decided_unix: 1_760_000_100,
            reviewer: user,
            final_label: label,
            note: Some("seen, agreed"),
            user_id: Some(user),
            auth_method: AuthMethod::UsersFile,
        })
        .unwrap();
    }
    Fixture { _tmp: tmp, store }
}

fn raw(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

#[test]
fn an_intact_trail_verifies_and_the_database_refuses_edits() {
    let f = fixture();
    mica()
        .args(["audit", "verify", "--store"])
        .arg(&f.store)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "7 rows (2 cases, 3 suggestions, 2 decisions), intact",
        ))
        .stdout(predicate::str::contains("OK"));
    let c = raw(&f.store);
    for sql in [
        "UPDATE case_decisions SET final_label = 'pneumonia' WHERE id = 1",
        "DELETE FROM case_decisions WHERE id = 2",
        "UPDATE case_predictions SET suggested_label = 'normal'",
        "DELETE FROM case_predictions",
        "DELETE FROM cases WHERE id = 'case-1'",
    ] {
        let e = c.execute(sql, []).expect_err(sql).to_string();
        assert!(e.contains("append-only"), "{sql}: {e}");
    }
    // The same store is found through $MICA_STORE, as `mica serve` finds it.
    mica()
        .env("MICA_STORE", &f.store)
        .args(["audit", "verify"])
        .assert()
        .success();
}

#[test]
fn a_tampered_decision_is_named_and_verify_exits_1() {
    let f = fixture();
    let out = mica()
        .args(["audit", "verify", "--json", "--store"])
        .arg(&f.store)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let head = serde_json::from_slice::<serde_json::Value>(&out).unwrap()["head_sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let c = raw(&f.store);
    c.execute_batch("DROP TRIGGER case_decisions_append_only_update;")
        .unwrap();
    c.execute("UPDATE case_decisions SET final_label = 'pneumonia' WHERE id = 1", [])
        .unwrap();
    drop(c);
    mica()
        .args(["audit", "verify", "--store"])
        .arg(&f.store)
        .arg("--expect-head")
        .arg(&head)
        .assert()
        .code(1)
        .stdout(predicate::str::contains(
            "chain BROKEN at case_decisions id=1 (chain_seq 6)",
        ))
        .stdout(predicate::str::contains("expected: "))
        .stdout(predicate::str::contains("case_decisions_append_only_update"))
        .stderr(predicate::str::contains("does not verify"));

    // Removing the newest decision leaves a valid but shorter chain: only the kept head shows it.
    let f = fixture();
    let st = Store::open_read_only(&f.store).unwrap();
    let head = st.verify_chain(None).unwrap().head_sha256;
    drop(st);
    let c = raw(&f.store);
    c.execute_batch("DROP TRIGGER case_decisions_append_only_delete;")
        .unwrap();
    c.execute("DELETE FROM case_decisions WHERE id = 2", []).unwrap();
    c.execute_batch(
        "CREATE TRIGGER case_decisions_append_only_delete BEFORE DELETE ON case_decisions BEGIN SELECT RAISE(ABORT, 'append-only: a decision cannot be deleted'); END;",
    )
    .unwrap();
    drop(c);
    mica()
        .args(["audit", "verify", "--store"])
        .arg(&f.store)
        .assert()
        .success();
    mica()
        .args(["audit", "verify", "--store"])
        .arg(&f.store)
        .args(["--expect-head", &head])
        .assert()
        .code(1)
        .stdout(predicate::str::contains("is not in the chain"));
}

#[test]
fn export_round_trips_as_csv_and_json() {
    let f = fixture();
    let want = Store::open_read_only(&f.store).unwrap().audit_entries().unwrap();
    assert_eq!(want.len(), 2);
    assert_eq!(
        want[0].predictions_shown[1].resolved_model.as_deref(),
        Some("gpt-4o-2024-08-06")
    );
    let dir = f.store.parent().unwrap();
    let csv = dir.join("audit.csv");
    mica()
        .args(["audit", "export", "--format", "csv", "--store"])
        .arg(&f.store)
        .arg("--out")
        .arg(&csv)
        .assert()
        .success()
        .stderr(predicate::str::contains("wrote 2 decision(s)"));
    let got = audit::read_csv(std::fs::File::open(&csv).unwrap()).unwrap();
    assert_eq!(got, want);
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.starts_with("decision_id,case_id,decided_unix,decided_utc,reviewer,user_id,auth_method,"));

    let out = mica()
        .args(["audit", "export", "--format", "json", "--store"])
        .arg(&f.store)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let got: Vec<AuditEntry> = serde_json::from_value(doc["decisions"].clone()).unwrap();
    assert_eq!(got, want);
    assert_eq!(doc["chain"]["ok"], true);
    assert_eq!(got[1].user_id.as_deref(), Some("bob"));
    assert_eq!(got[1].auth_method.as_deref(), Some("users-file"));
    assert_eq!(got[1].predictions_shown.len(), 1);
}

#[test]
fn an_old_store_is_verifiable_once_migrated_and_says_what_was_not_protected() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("old.sqlite");
    let c = raw(&store);
    // The case tables exactly as mica created them before the audit chain.
    c.execute_batch(
        "CREATE TABLE cases (id TEXT PRIMARY KEY, created_unix INTEGER NOT NULL, image_sha256 TEXT NOT NULL, image_format TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, frames INTEGER NOT NULL, deidentified_json TEXT NOT NULL, labels_json TEXT NOT NULL, review_threshold REAL NOT NULL, needs_review INTEGER NOT NULL, review_reasons_json TEXT NOT NULL);
         CREATE TABLE case_predictions (case_id TEXT NOT NULL REFERENCES cases(id) ON DELETE CASCADE, position INTEGER NOT NULL, classifier TEXT NOT NULL, model_version TEXT NOT NULL, family TEXT NOT NULL, outcome TEXT NOT NULL, suggested_label TEXT, confidence REAL, latency_ms REAL NOT NULL, energy_wh REAL, energy_method TEXT NOT NULL, detail_json TEXT NOT NULL, PRIMARY KEY (case_id, position));
         CREATE TABLE case_decisions (id INTEGER PRIMARY KEY AUTOINCREMENT, case_id TEXT NOT NULL REFERENCES cases(id) ON DELETE CASCADE, decided_unix INTEGER NOT NULL, reviewer TEXT NOT NULL, final_label TEXT NOT NULL, note TEXT);
         INSERT INTO cases VALUES ('old', 1700000000, 'ab', 'png', 4, 4, 1, '[]', '[\"normal\",\"pneumonia\"]', 0.7, 0, '[]');
         INSERT INTO case_decisions (case_id, decided_unix, reviewer, final_label) VALUES ('old', 1700000100, 'Dr Free Text', 'normal');",
    )
    .unwrap();
    drop(c);
    mica()
        .args(["audit", "verify", "--store"])
        .arg(&store)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no audit chain"));
    // Any ordinary open migrates it (here `mica runs list`, as `mica serve` would).
    mica().args(["runs", "list", "--store"]).arg(&store).assert().success();
    mica()
        .args(["audit", "verify", "--store"])
        .arg(&store)
        .assert()
        .success()
        .stdout(predicate::str::contains("the first 2 rows existed before"));
    let e = Store::open_read_only(&store).unwrap().audit_entries().unwrap();
    assert!(e[0].chained_at_migration);
    assert_eq!(
        (e[0].reviewer.as_str(), e[0].user_id.as_deref()),
        ("Dr Free Text", None)
    );
    let err = raw(&store)
        .execute("DELETE FROM cases WHERE id = 'old'", [])
        .unwrap_err()
        .to_string();
    assert!(err.contains("append-only"), "{err}");
}
