//! Cross-check of `energy.csv` against CodeCarbon itself.
//!
//! When `python3` with `venv` is available, a virtual environment is created once under
//! cargo's target tmp dir (reused afterwards) with `pip install codecarbon==3.3.2` (which
//! brings pandas). The file mica writes must then: start with exactly the fields of
//! CodeCarbon's `EmissionsData` dataclass, in order; load with pandas with every numeric column
//! numeric; build an `EmissionsData` from each row; and satisfy the relations CodeCarbon's
//! tracker produces (`energy_consumed` = the sum of the component energies, each PUE-scaled;
//! power columns PUE-scaled too where the installed tracker does that). Without Python or
//! network the test prints SKIPPED and passes, unless `MICA_REQUIRE_SKLEARN=1` (the same switch
//! as the scikit-learn cross-check, so CI sets one variable).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use mica_energy::{
    append_energy_csv, CarbonConfig, Component, ComponentEnergy, EnergyReport, Measurement,
    MeterDetails, Method, CODECARBON_COLUMNS, CSV_COLUMNS,
};
use serde_json::Value;

const CODECARBON: &str = "codecarbon==3.3.2";

const SCRIPT: &str = r#"
import dataclasses, inspect, json, math, sys, uuid
import pandas as pd
import codecarbon
from codecarbon.output_methods.emissions_data import EmissionsData
from codecarbon.emissions_tracker import BaseEmissionsTracker

fields = [f.name for f in dataclasses.fields(EmissionsData)]
numeric = [f.name for f in dataclasses.fields(EmissionsData) if f.type in (float, int)]
src = inspect.getsource(BaseEmissionsTracker._do_measurements)
power_has_pue = "power *= self._pue" in src
energy_has_pue = "energy *= self._pue" in src

df = pd.read_csv(sys.argv[1])
errors = []
header = list(df.columns)
if header[: len(fields)] != fields:
    errors.append(f"header {header[:len(fields)]} != EmissionsData fields {fields}")
for col in numeric:
    if col in df.columns:
        try:
            pd.to_numeric(df[col], errors="raise")
        except Exception as e:
            errors.append(f"{col}: not numeric: {e}")
filled = ["duration", "emissions", "emissions_rate", "cpu_power", "gpu_power", "ram_power",
          "cpu_energy", "gpu_energy", "ram_energy", "energy_consumed", "water_consumed",
          "cpu_count", "gpu_count", "ram_total_size", "pue", "wue"]
for col in filled:
    if df[col].isna().any():
        errors.append(f"{col}: empty")

def close(a, b, what, i):
    if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15):
        errors.append(f"row {i}: {what}: {a} vs {b}")

for i, r in df.iterrows():
    try:
        EmissionsData(**{k: r[k] for k in fields})
    except Exception as e:
        errors.append(f"row {i}: EmissionsData(**row) failed: {e}")
    parts = r.cpu_energy + r.gpu_energy + r.ram_energy
    close(r.energy_consumed, parts, "energy_consumed = cpu+gpu+ram energy (each PUE-scaled)", i)
    power_kwh = (r.cpu_power + r.gpu_power + r.ram_power) * r.duration / 3.6e6
    close(r.energy_consumed, power_kwh if power_has_pue else power_kwh * r.pue,
          "energy_consumed vs power columns x duration", i)
    close(r.emissions_rate, r.emissions / r.duration, "emissions_rate = emissions / duration", i)
    close(r.emissions, r.energy_consumed * r.carbon_intensity_g_per_kwh / 1000.0,
          "emissions = energy_consumed x intensity", i)
    close(r.water_consumed, r.wue * r.energy_consumed, "water_consumed = wue x energy_consumed", i)
    want = str(uuid.uuid5(uuid.NAMESPACE_URL, "mica:" + r.project_name))
    if r.experiment_id != want:
        errors.append(f"row {i}: experiment_id {r.experiment_id} != uuid5(URL, 'mica:'+project) {want}")
json.dump({"version": codecarbon.__version__, "fields": fields, "errors": errors,
           "power_has_pue": power_has_pue, "energy_has_pue": energy_has_pue,
           "rows": len(df)}, open(sys.argv[2], "w"))
"#;

fn skip(why: &str) {
    if std::env::var("MICA_REQUIRE_SKLEARN").is_ok_and(|v| v == "1") {
        panic!("CodeCarbon cross-check required (MICA_REQUIRE_SKLEARN=1) but unavailable: {why}");
    }
    eprintln!("SKIPPED CodeCarbon cross-check: {why}");
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        ))
    }
}

/// The venv's python, creating the venv on first use. A marker file records a finished
/// install, so an interrupted install is redone rather than trusted.
fn codecarbon_python() -> Result<PathBuf, String> {
    let dir = std::env::var_os("MICA_CODECARBON_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("codecarbon-venv"));
    let python = dir.join("bin").join("python");
    let marker = dir.join(".mica-installed");
    if marker.exists() && python.exists() {
        return Ok(python);
    }
    let base = std::env::var("MICA_PYTHON").unwrap_or_else(|_| "python3".into());
    Command::new(&base)
        .arg("--version")
        .output()
        .map_err(|e| format!("no `{base}` on PATH ({e})"))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    run(Command::new(&base).args(["-m", "venv"]).arg(&dir))
        .map_err(|e| format!("cannot create a venv (python3-venv missing?): {e}"))?;
    eprintln!("installing {CODECARBON} into {} (once)", dir.display());
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--timeout",
        "60",
        "--retries",
        "2",
        CODECARBON,
    ]))
    .map_err(|e| format!("pip install {CODECARBON} failed (no network?): {e}"))?;
    std::fs::write(&marker, b"ok").map_err(|e| e.to_string())?;
    Ok(python)
}

fn component(component: Component, label: &str, method: Method, joules: f64) -> ComponentEnergy {
    ComponentEnergy {
        component,
        label: label.into(),
        method,
        joules,
    }
}

/// Two windows: a CPU-only estimate at PUE 1.5, and RAPL plus two GPUs at PUE 1.2.
fn reports() -> Vec<EnergyReport> {
    let measurement = |secs: u64, components| Measurement {
        started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        duration: Duration::from_secs(secs),
        components,
        notes: vec![],
        details: MeterDetails::default(),
        unavailable: vec![],
    };
    let cpu_only = measurement(
        100,
        vec![
            component(
                Component::Cpu,
                "process",
                Method::EstimatedCpuTimeTdp,
                3.6e6,
            ),
            component(
                Component::Ram,
                "process",
                Method::EstimatedCpuTimeTdp,
                1.8e6,
            ),
        ],
    );
    let gpus = measurement(
        37,
        vec![
            component(Component::Cpu, "package-0", Method::MeasuredRapl, 5123.25),
            component(
                Component::Ram,
                "dram (package-0)",
                Method::MeasuredRapl,
                311.5,
            ),
            component(
                Component::Gpu,
                "gpu0 NVIDIA H100 80GB HBM3",
                Method::MeasuredNvml,
                20_000.0,
            ),
            component(
                Component::Gpu,
                "gpu1 NVIDIA H100 80GB HBM3",
                Method::MeasuredNvml,
                19_000.0,
            ),
        ],
    );
    vec![
        EnergyReport::new(
            "brain-mri, cnn",
            &cpu_only,
            &CarbonConfig::resolve(Some("FRA"), None, Some(1.5)).unwrap(),
            100,
        ),
        EnergyReport::new(
            "brain-mri/llm",
            &gpus,
            &CarbonConfig::resolve(None, Some(420.0), Some(1.2)).unwrap(),
            50,
        ),
    ]
}

#[test]
fn energy_csv_matches_codecarbon() {
    // What does not need Python: the CodeCarbon block is where CodeCarbon has it.
    assert_eq!(CSV_COLUMNS[0], "timestamp");
    assert_eq!(CSV_COLUMNS[CODECARBON_COLUMNS - 1], "wue");
    let python = match codecarbon_python() {
        Ok(p) => p,
        Err(why) => return skip(&why),
    };
    let dir = tempfile::tempdir().unwrap();
    let (csv, out, script) = (
        dir.path().join("energy.csv"),
        dir.path().join("out.json"),
        dir.path().join("check.py"),
    );
    for r in reports() {
        append_energy_csv(&csv, &r).unwrap();
    }
    std::fs::write(&script, SCRIPT).unwrap();
    if let Err(e) = run(Command::new(&python).arg(&script).arg(&csv).arg(&out)) {
        return skip(&format!("reference script failed: {e}"));
    }
    let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    eprintln!(
        "CodeCarbon {}: power x PUE {}, energy x PUE {}",
        v["version"], v["power_has_pue"], v["energy_has_pue"]
    );
    let fields: Vec<&str> = v["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(fields, CSV_COLUMNS[..CODECARBON_COLUMNS]);
    assert_eq!(v["rows"], 2);
    assert_eq!(v["energy_has_pue"], true);
    let errors = v["errors"].as_array().unwrap();
    assert!(
        errors.is_empty(),
        "disagreements with CodeCarbon:\n{errors:#?}"
    );
}
