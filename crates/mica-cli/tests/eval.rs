//! End-to-end tests of `mica eval`: output, JSON, McNemar, and every bad-input message.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

fn mica() -> Command {
    Command::cargo_bin("mica").unwrap()
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// true a a a b b c / pred a a b b c c: accuracy 4/6, per-class F1 0.8, 0.5, 2/3.
const THREE: &str = "id,label,prediction\n1,a,a\n2,a,a\n3,a,b\n4,b,b\n5,b,c\n6,c,c\n";

#[test]
fn human_table_shows_headline_per_class_and_confusion() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "p.csv", THREE);
    mica()
        .arg("eval")
        .arg(&p)
        .assert()
        .success()
        .stdout(predicate::str::contains("6 images, 3 classes (a, b, c)"))
        .stdout(predicate::str::contains("accuracy             0.6667   95% CI"))
        .stdout(predicate::str::contains("macro F1             0.6556"))
        .stdout(predicate::str::contains("Cohen's kappa        0.5000"))
        .stdout(predicate::str::contains("ROC AUC (OvR macro)  n/a"))
        .stdout(predicate::str::is_match(r"(?m)^  a +1\.0000 +0\.6667 +0\.8000 +3$").unwrap())
        .stdout(predicate::str::is_match(r"(?m)^  b +0 +1 +1$").unwrap())
        .stdout(predicate::str::contains("not diagnoses"));
}

#[test]
fn json_report_has_the_exact_values() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "p.csv",
        "label,prediction,prob_a,prob_b\na,a,0.9,0.1\na,b,0.4,0.6\nb,b,0.2,0.8\nb,failed,,\n",
    );
    // The failed row has no probabilities, so AUC and ECE are off with a note.
    let out = mica().args(["eval", "--json", "--resamples", "200"]).arg(&p).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["n"], 4);
    assert_eq!(v["no_answer"], 1);
    assert_eq!(v["accuracy"], 0.5);
    assert_eq!(v["confusion"]["matrix"], serde_json::json!([[1, 1], [0, 1]]));
    assert_eq!(v["confusion"]["no_answer"], serde_json::json!([0, 1]));
    assert_eq!(v["per_class"]["b"]["recall"], 0.5);
    assert!(v["roc_auc_macro"].is_null());
    assert!(v["notes"][0].as_str().unwrap().contains("line 5 has no probabilities"));
    assert_eq!(v["bootstrap"]["resamples"], 200);

    let p2 = write(dir.path(), "q.csv", "label,prediction,prob_a,prob_b\na,a,0.9,0.1\na,b,0.4,0.6\nb,b,0.2,0.8\nb,a,0.5,0.5\n");
    let out = mica().args(["eval", "--json"]).arg(&p2).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // b-scores: positives {0.8, 0.5} vs negatives {0.1, 0.6}: 0.8 beats both, 0.5 beats 0.1.
    assert_eq!(v["roc_auc_macro"], 0.75);
    assert!(v["ece"].is_number());
}

#[test]
fn versus_reports_mcnemar() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.csv", THREE);
    let b = write(dir.path(), "b.csv", "label,prediction\na,a\na,b\na,b\nb,b\nb,b\nc,unparseable\n");
    let out = mica().args(["eval", "--json"]).arg(&a).arg("--versus").arg(&b).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // A right only on rows 2 and 6; B right only on row 5 -> b = 2, c = 1; exact p = 1.
    assert_eq!(v["mcnemar"]["b"], 2);
    assert_eq!(v["mcnemar"]["c"], 1);
    assert_eq!(v["mcnemar"]["exact"], true);
    assert_eq!(v["mcnemar"]["p_value"], 1.0);
    assert_eq!(v["b"]["report"]["no_answer"], 1);
    mica()
        .arg("eval")
        .arg(&a)
        .arg("--versus")
        .arg(&b)
        .assert()
        .success()
        .stdout(predicate::str::contains("McNemar's test"))
        .stdout(predicate::str::contains("exact binomial"))
        .stdout(predicate::str::contains("no significant difference"));
}

#[test]
fn unknown_prediction_is_a_data_error_naming_line_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "p.csv", "label,prediction\nnormal,normal\ncovid,pneumonia\n");
    mica()
        .arg("eval")
        .arg(&p)
        .assert()
        .code(1)
        .stderr(predicate::str::is_match(r"^error: .*p\.csv:3: prediction `pneumonia` is not a known label \(labels: covid, normal\)").unwrap())
        .stderr(predicate::str::contains("panicked").not());
}

#[test]
fn missing_column_is_a_data_error_naming_file_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "p.csv", "label,predicted\nnormal,normal\n");
    mica()
        .arg("eval")
        .arg(&p)
        .assert()
        .code(1)
        .stderr(predicate::str::is_match(r"^error: .*p\.csv: missing column `prediction`").unwrap());
    let p = write(dir.path(), "q.csv", "truth,prediction\nnormal,normal\n");
    mica().arg("eval").arg(&p).assert().code(1).stderr(predicate::str::contains("q.csv: missing column `label`"));
}

#[test]
fn bad_cells_and_empty_files_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body, msg) in [
        ("e.csv", "", "e.csv: empty file"),
        ("h.csv", "label,prediction\n", "h.csv: no prediction rows"),
        ("n.csv", "label,prediction,prob_a\na,a,high\n", "n.csv:2: column `prob_a`: `high` is not a number"),
        ("r.csv", "label,prediction\na,a\na,a,a\n", "r.csv:3: 3 fields, but the header has 2"),
    ] {
        let p = write(dir.path(), name, body);
        let out = mica().arg("eval").arg(&p).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{name}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: {err}");
    }
}

#[test]
fn versus_with_different_images_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.csv", THREE);
    let short = write(dir.path(), "short.csv", "label,prediction\na,a\n");
    mica()
        .arg("eval")
        .arg(&a)
        .arg("--versus")
        .arg(&short)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("short.csv: 1 rows, but"));
    let other = write(dir.path(), "other.csv", "label,prediction\na,a\na,a\nb,b\nb,b\nb,c\nc,c\n");
    mica()
        .arg("eval")
        .arg(&a)
        .arg("--versus")
        .arg(&other)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("other.csv:4: label `b` differs from `a`"));
}

#[test]
fn missing_path_or_folder_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    mica()
        .arg("eval")
        .arg(dir.path().join("nope.csv"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("nope.csv: no such file"));
    mica()
        .arg("eval")
        .arg(dir.path())
        .assert()
        .code(2)
        .stderr(predicate::str::contains("is a folder, expected a predictions CSV file"));
}
