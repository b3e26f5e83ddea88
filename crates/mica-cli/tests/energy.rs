//! End-to-end tests of `mica energy` (probe, burn) against fake RAPL trees and the estimate.

use std::fs;
use std::path::Path;

use assert_cmd::Command;
use predicates::prelude::*;

fn mica() -> Command {
    Command::cargo_bin("mica").unwrap()
}

fn zone(root: &Path, id: &str, name: &str, energy: u64) {
    let d = root.join(id);
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("name"), format!("{name}\n")).unwrap();
    fs::write(d.join("energy_uj"), format!("{energy}\n")).unwrap();
    fs::write(d.join("max_energy_range_uj"), "262143328850\n").unwrap();
}

#[test]
fn probe_without_counters_says_why_and_labels_the_estimate() {
    let dir = tempfile::tempdir().unwrap();
    mica()
        .args(["energy", "probe", "--no-nvml", "--powercap-root"])
        .arg(dir.path().join("powercap"))
        .assert()
        .success()
        .stdout(predicate::str::contains("RAPL: unavailable:"))
        .stdout(predicate::str::contains("absent"))
        .stdout(predicate::str::contains("method: estimated:cpu-time*tdp"))
        .stdout(predicate::str::contains("WORLD AVERAGE"))
        .stdout(predicate::str::contains("TDP"));
}

#[test]
fn probe_finds_a_fake_rapl_tree() {
    let dir = tempfile::tempdir().unwrap();
    zone(dir.path(), "intel-rapl:0", "package-0", 1000);
    zone(dir.path(), "intel-rapl:0:0", "dram", 1000);
    zone(dir.path(), "intel-rapl:1", "psys", 1000);
    let out = mica()
        .args([
            "energy",
            "probe",
            "--json",
            "--no-nvml",
            "--country",
            "DEU",
            "--powercap-root",
        ])
        .arg(dir.path())
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["method"], "measured:rapl");
    assert_eq!(v["meters"][0]["meter"], "rapl");
    assert_eq!(v["carbon"]["country_iso_code"], "DEU");
    assert!(v["window_read_cost_us"].as_f64().unwrap() >= 0.0);
}

#[test]
fn bad_energy_flags_are_usage_errors() {
    mica()
        .args(["energy", "probe", "--no-nvml", "--country", "Atlantis"])
        .assert()
        .code(2)
        .stderr(predicate::str::starts_with("error: --country Atlantis"));
    mica()
        .args(["energy", "probe", "--no-nvml", "--pue", "0.5"])
        .assert()
        .code(2);
    mica()
        .args(["energy", "probe", "--no-nvml", "--tdp", "-3"])
        .assert()
        .code(2);
}

#[test]
fn burn_records_a_window_into_a_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = mica()
        .args([
            "energy",
            "burn",
            "--seconds",
            "0.3",
            "--tdp",
            "40",
            "--grid-intensity",
            "300",
            "--no-nvml",
            "--powercap-root",
            "/nonexistent",
            "--out",
        ])
        .arg(&run)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["method"], "estimated:cpu-time*tdp");
    assert_eq!(v["cpu"]["tdp_w"], 40.0);
    let cpu_wh = v["components"][0]["energy_wh"].as_f64().unwrap();
    // ~0.3 CPU-seconds at 40 W / threads: positive, and below the whole-TDP bound.
    assert!(cpu_wh > 0.0 && cpu_wh <= 40.0 * 1.0 / 3600.0, "{cpu_wh}");
    let csv = fs::read_to_string(run.join("energy.csv")).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("timestamp,project_name,run_id,"));
    assert!(header.contains(",method,"));
    assert!(lines.next().unwrap().contains("estimated:cpu-time*tdp"));
    assert!(run.join("energy.json").exists());
}
