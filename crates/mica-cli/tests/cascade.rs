//! End-to-end: `mica classify --classifier cascade:...` over the pixel baseline and an
//! OpenAI-format stub server, and the bad inputs it must answer with one clear error line.

use assert_cmd::Command;
use mica_run::testing::{completion, Server};

fn mica() -> Command {
    Command::cargo_bin("mica").unwrap()
}

/// stderr ends in exactly one `error: ...` line, with no panic.
fn error_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    errors[0].to_string()
}

#[test]
fn classify_runs_a_cascade_and_records_which_stage_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    mica_run::testing::tiny_dataset(&data, 10, 3, 4);
    let server = Server::start(|_| (200, completion("bright")));
    let out = tmp.path().join("run");
    // Threshold 1: only a baseline certain to the last bit keeps its own answer.
    let spec = format!("cascade:baseline,llm:openai-compatible/m@{}@1/0.5", server.url);
    let o = mica()
        .args(["classify", "--dataset"])
        .arg(&data)
        .args(["--classifier", &spec, "--filter", "none", "--no-cache", "--max-attempts", "1", "--cascade-context", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let preds = mica_core::read_predictions(out.join("predictions.jsonl")).unwrap();
    let m = mica_eval::RunMetrics::read(out.join("metrics.json")).unwrap();
    let s = &m.extra["cascade"];
    let reached = preds.iter().filter(|p| !p.extra["cascade"]["second"].is_null()).count();
    assert!(reached > 0, "some images reached the LLM");
    assert_eq!(server.requests(), reached, "one request per image that reached the LLM");
    assert_eq!(s["reached_second"].as_u64().unwrap() as usize, reached);
    assert!((s["share_second"].as_f64().unwrap() - reached as f64 / preds.len() as f64).abs() < 1e-12);
    let by_stage = |k: &str| s[k]["images"].as_u64().unwrap() as usize;
    assert_eq!(by_stage("first") + by_stage("second") + by_stage("physician"), preds.len());
    for p in &preds {
        let c = &p.extra["cascade"];
        let first_conf = c["first"]["confidence"].as_f64().unwrap();
        assert_eq!(c["second"].is_null(), first_conf >= 1.0, "{c}");
        assert!(c["reason"].as_str().unwrap().starts_with("first "), "{c}");
        assert_eq!(p.classifier, format!("cascade:baseline:centroid,llm:openai-compatible/m@{}@1/0.5+context", server.url));
    }
    assert_eq!(m.extra["family"], "cascade");
    assert_eq!(m.extra["cascade_stages"]["first"]["spec"], "baseline:centroid");
    for body in server.bodies() {
        assert!(body.contains("Another model's suggestion"), "--cascade-context reaches the prompt");
        assert!(!body.contains("bright_0") && !body.contains(".png\""), "no file name in a prompt");
    }
}

#[test]
fn bad_cascades_get_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    mica_run::testing::tiny_dataset(&data, 3, 3, 4);
    for (args, want) in [
        (vec!["--classifier", "cascade:baseline,llm:openai/gpt-4o"], "no threshold"),
        (vec!["--classifier", "cascade:baseline,llm:openai/gpt-4o@1.2"], "outside 0..=1"),
        (vec!["--classifier", "cascade:baseline@0.5"], "two classifier specs"),
        (vec!["--classifier", "baseline", "--cascade-context"], "--cascade-context applies to a cascade"),
        (vec!["--classifier", "cascade:baseline,baseline@0.5", "--cascade-context"], "reads no prompt"),
    ] {
        let o = mica()
            .args(["classify", "--dataset"])
            .arg(&data)
            .args(&args)
            .arg("--out")
            .arg(tmp.path().join("out"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        let line = error_line(&o);
        assert!(line.contains(want), "{args:?}: {line}");
    }
}
