//! `energy.csv`: CodeCarbon 3.3.2's `emissions.csv` columns, in its order and units (seconds,
//! kg, kWh, W), then mica's own columns. Tools that read CodeCarbon files read this one; the
//! extra columns say how each row was obtained.
//!
//! As in CodeCarbon, the power and energy columns include the PUE (`energy_consumed` is what the
//! facility drew) and `emissions` is `energy_consumed x intensity`.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use crate::meter::Component;
use crate::report::EnergyReport;
use crate::EnergyError;

/// CodeCarbon's columns, then mica's (`method` first among them).
pub const CSV_COLUMNS: &[&str] = &[
    "timestamp",
    "project_name",
    "run_id",
    "experiment_id",
    "duration",
    "emissions",
    "emissions_rate",
    "cpu_power",
    "gpu_power",
    "ram_power",
    "cpu_energy",
    "gpu_energy",
    "ram_energy",
    "energy_consumed",
    "water_consumed",
    "country_name",
    "country_iso_code",
    "region",
    "cloud_provider",
    "cloud_region",
    "os",
    "python_version",
    "codecarbon_version",
    "cpu_count",
    "cpu_model",
    "gpu_count",
    "gpu_model",
    "longitude",
    "latitude",
    "ram_total_size",
    "tracking_mode",
    "cpu_utilization_percent",
    "gpu_utilization_percent",
    "ram_utilization_percent",
    "ram_used_gb",
    "on_cloud",
    "pue",
    "wue",
    // mica's columns.
    "method",
    "images",
    "tdp_w",
    "carbon_intensity_g_per_kwh",
    "carbon_intensity_source",
    "mica_version",
];

fn row(r: &EnergyReport) -> Vec<String> {
    let pue = r.carbon.pue;
    let kwh = |c: Component| r.component_wh(c) / 1000.0 * pue;
    let watts = |c: Component| {
        if r.duration_s > 0.0 {
            r.component_wh(c) * 3600.0 / r.duration_s * pue
        } else {
            0.0
        }
    };
    let emissions_kg = r.co2e_g / 1000.0;
    let f = |x: f64| format!("{x}");
    let opt = |x: Option<String>| x.unwrap_or_default();
    let cpu = r.cpu.as_ref();
    vec![
        r.timestamp.clone(),
        r.project_name.clone(),
        r.run_id.clone(),
        String::new(),
        f(r.duration_s),
        f(emissions_kg),
        f(if r.duration_s > 0.0 {
            emissions_kg / r.duration_s
        } else {
            0.0
        }),
        f(watts(Component::Cpu)),
        f(watts(Component::Gpu)),
        f(watts(Component::Ram)),
        f(kwh(Component::Cpu)),
        f(kwh(Component::Gpu)),
        f(kwh(Component::Ram)),
        f(r.facility_energy_wh / 1000.0),
        "0".into(),
        opt(r.carbon.country_name.clone()),
        opt(r.carbon.country_iso_code.clone()),
        String::new(),
        String::new(),
        String::new(),
        format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        String::new(),
        String::new(),
        opt(cpu.map(|c| c.threads.to_string())),
        opt(cpu.map(|c| c.model.clone())),
        r.gpu.as_ref().map(|g| g.count).unwrap_or(0).to_string(),
        opt(r.gpu.as_ref().map(|g| g.model.clone())),
        String::new(),
        String::new(),
        String::new(),
        r.tracking_mode.clone(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        "N".into(),
        f(pue),
        "0".into(),
        r.method.clone(),
        r.images.to_string(),
        opt(cpu.map(|c| f(c.tdp_w))),
        f(r.carbon.intensity_g_per_kwh),
        r.carbon.source_detail.clone(),
        env!("CARGO_PKG_VERSION").into(),
    ]
}

/// Appends one row for `report`, writing the header first if the file is new or empty. An
/// existing file with other columns is an error (rows would land under the wrong headers).
pub fn append_energy_csv(path: &Path, report: &EnergyReport) -> Result<(), EnergyError> {
    let header = CSV_COLUMNS.join(",");
    let needs_header = match std::fs::File::open(path) {
        Ok(f) => {
            let mut first = String::new();
            BufReader::new(f)
                .read_line(&mut first)
                .map_err(|e| EnergyError::io(path, e))?;
            let first = first.trim_end_matches(['\n', '\r']);
            if first.is_empty() {
                true
            } else if first != header {
                return Err(EnergyError::Format {
                    path: path.to_path_buf(),
                    message: "existing file has different columns than mica's energy.csv; move it away or choose another run directory".into(),
                });
            } else {
                false
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(EnergyError::io(path, e)),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| EnergyError::io(dir, e))?;
    }
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let in_memory = "CSV into memory cannot fail";
    if needs_header {
        w.write_record(CSV_COLUMNS).expect(in_memory);
    }
    w.write_record(row(report)).expect(in_memory);
    let text = w.into_inner().expect(in_memory);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| EnergyError::io(path, e))?;
    if needs_header {
        // An empty file left by a crash: start it over.
        file.set_len(0).map_err(|e| EnergyError::io(path, e))?;
    }
    file.write_all(&text)
        .and_then(|_| file.flush())
        .map_err(|e| EnergyError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carbon::CarbonConfig;
    use crate::meter::{ComponentEnergy, Measurement, MeterDetails, Method};
    use crate::util::split_csv_line;
    use std::time::{Duration, SystemTime};

    fn report(images: usize) -> EnergyReport {
        let m = Measurement {
            started_at: SystemTime::now(),
            duration: Duration::from_secs(100),
            components: vec![
                ComponentEnergy {
                    component: Component::Cpu,
                    label: "process".into(),
                    method: Method::EstimatedCpuTimeTdp,
                    joules: 3.6e6,
                },
                ComponentEnergy {
                    component: Component::Ram,
                    label: "process".into(),
                    method: Method::EstimatedCpuTimeTdp,
                    joules: 1.8e6,
                },
            ],
            notes: vec![],
            details: MeterDetails::default(),
            unavailable: vec![],
        };
        let carbon = CarbonConfig::resolve(Some("FRA"), None, Some(1.5)).unwrap();
        EnergyReport::new("proj, with comma", &m, &carbon, images)
    }

    #[test]
    fn header_then_rows_with_codecarbon_units() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.csv");
        append_energy_csv(&path, &report(10)).unwrap();
        append_energy_csv(&path, &report(20)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let header = split_csv_line(lines[0]);
        assert_eq!(header.len(), CSV_COLUMNS.len());
        assert_eq!(
            &header[..5],
            [
                "timestamp",
                "project_name",
                "run_id",
                "experiment_id",
                "duration"
            ]
        );
        assert!(header.contains(&"method".to_string()));
        let row = split_csv_line(lines[1]);
        assert_eq!(row.len(), header.len());
        let col = |name: &str| row[header.iter().position(|h| h == name).unwrap()].clone();
        assert_eq!(col("project_name"), "proj, with comma");
        // 1 kWh CPU x PUE 1.5.
        assert_eq!(col("cpu_energy").parse::<f64>().unwrap(), 1.5);
        assert_eq!(col("ram_energy").parse::<f64>().unwrap(), 0.75);
        assert_eq!(col("energy_consumed").parse::<f64>().unwrap(), 2.25);
        // 3.6 MJ over 100 s = 36 kW, x 1.5.
        assert_eq!(col("cpu_power").parse::<f64>().unwrap(), 54_000.0);
        let intensity: f64 = col("carbon_intensity_g_per_kwh").parse().unwrap();
        let kg: f64 = col("emissions").parse().unwrap();
        assert!((kg - 2.25 * intensity / 1000.0).abs() < 1e-9);
        assert_eq!(col("method"), "estimated:cpu-time*tdp");
        assert_eq!(col("country_iso_code"), "FRA");
        assert_eq!(col("images"), "10");
        assert_eq!(
            split_csv_line(lines[2])[header.iter().position(|h| h == "images").unwrap()],
            "20"
        );
    }

    #[test]
    fn foreign_csv_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.csv");
        std::fs::write(&path, "a,b\n1,2\n").unwrap();
        let err = append_energy_csv(&path, &report(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("energy.csv") && err.contains("different columns"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a,b\n1,2\n");
    }
}
