//! End-to-end tests of `mica compare`, `mica report` and `mica runs` on a small generated
//! image-folder dataset with the pixel baseline (fast, no network, no training).

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

fn mica() -> Command {
    // Every command below that indexes runs is given --store, so the user's store is untouched.
    Command::cargo_bin("mica").unwrap()
}

fn make_dataset(root: &Path, per_class: usize) {
    mica_run::testing::tiny_dataset(root, per_class, 11, 4);
}

struct Fixture {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    runs: PathBuf,
    store: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 20);
    Fixture {
        data,
        runs: tmp.path().join("runs"),
        store: tmp.path().join("store/runs.sqlite"),
        _tmp: tmp,
    }
}

fn compare(f: &Fixture, out: &Path, extra: &[&str]) -> assert_cmd::assert::Assert {
    mica()
        .arg("compare")
        .arg("--dataset")
        .arg(&f.data)
        .args(["--classifier", "baseline", "--bootstrap", "50", "--country", "FRA", "--tdp", "15"])
        .arg("--out")
        .arg(out)
        .arg("--store")
        .arg(&f.store)
        .args(extra)
        .assert()
}

#[test]
fn compare_prints_the_table_writes_the_report_and_indexes_the_run() {
    let f = fixture();
    let out = f.runs.join("tiny");
    compare(&f, &out, &[])
        .success()
        .stdout(predicate::str::contains("baseline:centroid"))
        .stdout(predicate::str::contains("Accuracy % (95 % CI)"))
        .stdout(predicate::str::contains("report: "))
        .stdout(predicate::str::contains("indexed as run 1"));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<table class=\"headline\""));
    assert!(out.join("report.md").is_file());

    // Report figures equal metrics.json.
    let assert = mica()
        .args(["report", "--format", "json"])
        .arg(&out)
        .assert()
        .success();
    let path = String::from_utf8(assert.get_output().stdout.clone()).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(path.trim()).unwrap()).unwrap();
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("baseline-centroid/metrics.json")).unwrap()).unwrap();
    let row = &report["headline"][0];
    assert_eq!(row["accuracy"], metrics["all"]["accuracy"]);
    assert_eq!(row["macro_f1"], metrics["all"]["macro_f1"]);
    assert_eq!(row["weighted_f1"], metrics["all"]["weighted_f1"]);
    assert_eq!(row["accuracy_ci"], metrics["all"]["accuracy_ci"]);
    assert_eq!(row["latency_p50_ms"], metrics["latency_ms"]["p50"]);
    assert_eq!(row["wh_per_1000"], metrics["energy"]["per_1000_images"]["energy_wh"]);

    mica()
        .args(["runs", "list", "--store"])
        .arg(&f.store)
        .assert()
        .success()
        .stdout(predicate::str::contains("tiny"))
        .stdout(predicate::str::contains("baseline:centroid"));
    mica()
        .args(["runs", "show", "tiny", "--store"])
        .arg(&f.store)
        .assert()
        .success()
        .stdout(predicate::str::contains("baseline:centroid"))
        .stdout(predicate::str::contains("images"));
    mica()
        .args(["runs", "show", "99", "--store"])
        .arg(&f.store)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no run `99`"));

    // A second compare reuses the finished classifier.
    compare(&f, &out, &[])
        .success()
        .stderr(predicate::str::contains("reused"));

    // Headless Chromium renders the table and the figures (skipped without Chromium).
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/report_screenshot.sh");
    let png = out.join("report.png");
    let o = std::process::Command::new("bash")
        .arg(&script)
        .arg(out.join("report.html"))
        .arg(&png)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    if stdout.contains("skipped") {
        // CI installs Chromium and sets this, so a missing browser fails there instead of
        // silently skipping the rendering check.
        assert!(
            std::env::var("MICA_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "MICA_REQUIRE_CHROMIUM=1 but {stdout}"
        );
        eprintln!("{stdout}");
    } else {
        assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
        assert!(std::fs::metadata(&png).unwrap().len() > 10_000, "screenshot too small");
        // Kept as a test artifact next to the web app's screenshots.
        let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
        std::fs::create_dir_all(&artifacts).unwrap();
        std::fs::copy(&png, artifacts.join("report.png")).unwrap();
    }
}

#[test]
fn shards_run_separately_and_report_merges_them() {
    let f = fixture();
    let out = f.runs.join("sharded");
    compare(&f, &out, &["--shard", "1/2"])
        .success()
        .stdout(predicate::str::contains("shard 1/2"));
    // Half the shards: the report refuses to pretend it has the whole test set.
    mica()
        .args(["report"])
        .arg(&out)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("2-of-2"));
    compare(&f, &out, &["--shard", "2/2"]).success();
    mica()
        .args(["report", "--format", "md", "--table"])
        .arg(&out)
        .assert()
        .success()
        .stdout(predicate::str::contains("report.md"))
        .stdout(predicate::str::contains("baseline:centroid"));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("baseline-centroid/metrics.json")).unwrap()).unwrap();
    assert_eq!(m["images"], 16, "both shards merged");
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let f = fixture();
    for args in [
        vec!["report", "/definitely/not/here"],
        vec!["compare", "--config", "/definitely/not/here.toml"],
        vec!["compare"],
    ] {
        let a = mica().args(&args).assert().code(2);
        let err = String::from_utf8(a.get_output().stderr.clone()).unwrap();
        assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "{err}");
    }
    mica()
        .arg("compare")
        .arg("--dataset")
        .arg(&f.data)
        .args(["--classifier", "svm"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("classifier `svm`"));
    compare(&f, &f.runs.join("x"), &["--shard", "3/2"])
        .code(2)
        .stderr(predicate::str::contains("--shard 3/2"));
    let out = f.runs.join("fmt");
    compare(&f, &out, &["--no-report"]).success();
    mica()
        .args(["report", "--format", "pdf"])
        .arg(&out)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unknown report format `pdf`"));
    let bad = f.runs.join("bad.toml");
    std::fs::write(&bad, "[dataset]\npath = 3\n").unwrap();
    mica()
        .args(["compare", "--config"])
        .arg(&bad)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("bad.toml"));
}
