//! End-to-end: `mica demo --quick` runs every stage (synth, train, LLM simulator, compare,
//! report, store) and a second run resumes instead of redoing the work.

use assert_cmd::Command;
use predicates::prelude::*;

fn mica() -> Command {
    let mut c = Command::cargo_bin("mica").unwrap();
    c.env_remove("MICA_DEMO_LLM").env_remove("OPENAI_API_KEY");
    c
}

#[test]
fn quick_demo_writes_a_report_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let store = dir.path().join("runs.sqlite");
    let args = [
        "demo",
        "--quick",
        "--modality",
        "mri",
        "--simulated-llm",
        "--out",
        out.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ];
    mica()
        .args(args)
        .assert()
        .success()
        .stdout(predicate::str::contains("SIMULATED"))
        .stdout(predicate::str::contains("report.html"));
    let html = std::fs::read_to_string(out.join("mri/report.html")).unwrap();
    for needle in ["cnn:small", "cnn:mobilenet", "baseline", "SIMULATED", "<svg"] {
        assert!(html.contains(needle), "report.html lacks {needle}");
    }
    // Nothing in the report may reach the network: one self-contained file.
    assert!(!html.contains("<script src") && !html.contains("href=\"http"), "report loads external resources");
    let metrics = out.join("mri/cnn-small/metrics.json");
    let before = std::fs::read(&metrics).unwrap();

    // Second run: everything is reused, nothing is retrained or reclassified.
    mica()
        .args(args)
        .assert()
        .success()
        .stderr(predicate::str::contains("reused"));
    assert_eq!(std::fs::read(&metrics).unwrap(), before);

    mica()
        .args(["runs", "list", "--store", store.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains("demo/mri").and(predicate::str::contains("[SIMULATED]")));
}

#[test]
fn demo_rejects_an_unknown_modality_as_usage_error() {
    mica()
        .args(["demo", "--quick", "--modality", "pet", "--out", "/nonexistent/x"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unknown modality"));
}
