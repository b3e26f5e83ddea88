//! `energy.csv`: CodeCarbon 3.3.2's `emissions.csv` columns (its `EmissionsData` dataclass),
//! in its order and units (seconds, kg, kWh, W, GB), then mica's own columns. Tools that read
//! CodeCarbon files read this one; the extra columns say how each row was obtained.
//!
//! Column semantics, as CodeCarbon's `EmissionsTracker` fills them:
//! - `timestamp`: when the row was produced, i.e. the window's end (UTC here; CodeCarbon
//!   writes local time without a zone);
//! - `cpu_energy`, `gpu_energy`, `ram_energy` (kWh) and `cpu_power`, `gpu_power`,
//!   `ram_power` (mean W) all include the PUE: CodeCarbon multiplies each measured energy by
//!   it before accumulating, and since 3.3.1 (PR mlco2/codecarbon#1332) each power too, so
//!   that `energy_consumed` = `cpu_energy + gpu_energy + ram_energy` =
//!   `(cpu_power + gpu_power + ram_power) x duration / 3.6e6` (before 3.3.1 the power columns
//!   were the devices' own);
//! - `emissions` (kg) is `energy_consumed x intensity`, `emissions_rate` kg/s;
//! - `experiment_id`: the report's (UUID v5 of the project name unless set, see
//!   [`crate::experiment_uuid`]);
//! - `cpu_count`: logical CPUs online; `ram_total_size`: total memory in GB of 2^30 bytes;
//! - `gpu_count` / `gpu_model`: the GPUs whose energy is in the row (not merely visible
//!   ones), `gpu_model` as CodeCarbon's `N x name`;
//! - what mica does not know is left empty (region, cloud, coordinates, Python and
//!   CodeCarbon versions, utilisation averages) rather than written as a made-up 0.

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
    "scope",
    "not_measured",
];

/// How many of [`CSV_COLUMNS`] are CodeCarbon's (the rest are mica's).
pub const CODECARBON_COLUMNS: usize = 38;

/// `N x name` per distinct model of the GPUs whose energy is counted, joined with `, `, and
/// their number. Component labels are `gpu<index> <name>`.
fn measured_gpus(r: &EnergyReport) -> (usize, String) {
    let mut names: Vec<(String, usize)> = Vec::new();
    let mut count = 0;
    for c in r
        .components
        .iter()
        .filter(|c| c.component == Component::Gpu && c.method.counts_in_totals())
    {
        count += 1;
        let name = c
            .label
            .split_once(' ')
            .filter(|(id, _)| id.starts_with("gpu"))
            .map_or(c.label.as_str(), |(_, n)| n)
            .to_string();
        match names.iter_mut().find(|(n, _)| *n == name) {
            Some((_, k)) => *k += 1,
            None => names.push((name, 1)),
        }
    }
    let model = names
        .iter()
        .map(|(n, k)| format!("{k} x {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    (count, model)
}

/// The window's end, for CodeCarbon's `timestamp`; the start where it cannot be parsed.
fn end_timestamp(r: &EnergyReport) -> String {
    match crate::util::parse_iso_utc(&r.timestamp) {
        Some(start) if start >= 0 => {
            let end = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(start as u64)
                + std::time::Duration::from_secs_f64(r.duration_s.max(0.0));
            mica_core::time::iso_utc(end)
        }
        _ => r.timestamp.clone(),
    }
}

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
    let (gpu_count, gpu_model) = measured_gpus(r);
    let experiment_id = if r.experiment_id.is_empty() {
        crate::util::experiment_uuid(&r.project_name)
    } else {
        r.experiment_id.clone()
    };
    let cpu_model = cpu
        .map(|c| c.model.clone())
        .or_else(|| crate::util::host_info().cpu_model);
    let cpu_count = r.cpu_count.or(cpu.map(|c| c.threads));
    let water_l = 0.0;
    let mut row = vec![
        end_timestamp(r),
        r.project_name.clone(),
        r.run_id.clone(),
        experiment_id,
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
        f(water_l),
        opt(r.carbon.country_name.clone()),
        opt(r.carbon.country_iso_code.clone()),
        String::new(),
        String::new(),
        String::new(),
        crate::util::os_platform(),
        String::new(),
        String::new(),
        opt(cpu_count.map(|n| n.to_string())),
        opt(cpu_model),
        gpu_count.to_string(),
        gpu_model,
        String::new(),
        String::new(),
        opt(r.ram_total_gb.map(f)),
        r.tracking_mode.clone(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        "N".into(),
        f(pue),
        // CodeCarbon's default WUE: water_consumed = wue x energy_consumed.
        "0".into(),
    ];
    debug_assert_eq!(row.len(), CODECARBON_COLUMNS);
    row.extend([
        r.method.clone(),
        r.images.to_string(),
        opt(cpu.map(|c| f(c.tdp_w))),
        f(r.carbon.intensity_g_per_kwh),
        r.carbon.source_detail.clone(),
        env!("CARGO_PKG_VERSION").into(),
        r.scope.clone(),
        r.not_measured.join("; "),
    ]);
    row
}

/// Appends one row for `report`, writing the header first if the file is new or empty. A file
/// written by an older mica (a subset of today's columns, e.g. before `scope`) gets the row
/// under its own columns, so resumed runs keep one file; any other columns are an error (rows
/// would land under the wrong headers).
pub fn append_energy_csv(path: &Path, report: &EnergyReport) -> Result<(), EnergyError> {
    let header = CSV_COLUMNS.join(",");
    let mut columns: Option<Vec<String>> = None;
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
                let existing = crate::util::split_csv_line(first);
                if !existing.iter().all(|c| CSV_COLUMNS.contains(&c.as_str())) {
                    return Err(EnergyError::Format {
                        path: path.to_path_buf(),
                        message: "existing file has different columns than mica's energy.csv; move it away or choose another run directory".into(),
                    });
                }
                columns = Some(existing);
                false
            } else {
                false
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(EnergyError::io(path, e)),
    };
    let mut record = row(report);
    if let Some(cols) = columns {
        record = cols
            .iter()
            .map(|c| {
                let i = CSV_COLUMNS
                    .iter()
                    .position(|k| k == c)
                    .expect("checked above");
                std::mem::take(&mut record[i])
            })
            .collect();
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| EnergyError::io(dir, e))?;
    }
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let in_memory = "CSV into memory cannot fail";
    if needs_header {
        w.write_record(CSV_COLUMNS).expect(in_memory);
    }
    w.write_record(&record).expect(in_memory);
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

    fn report_with(images: usize, extra: Vec<ComponentEnergy>) -> EnergyReport {
        let mut components = vec![
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
        ];
        components.extend(extra);
        let m = Measurement {
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_secs(100),
            components,
            notes: vec![],
            details: MeterDetails::default(),
            unavailable: vec![],
        };
        let carbon = CarbonConfig::resolve(Some("FRA"), None, Some(1.5)).unwrap();
        EnergyReport::new("proj, with comma", &m, &carbon, images)
    }

    fn report(images: usize) -> EnergyReport {
        report_with(images, vec![])
    }

    /// The header and the rows of a file, each row as column -> value.
    fn read(path: &Path) -> (Vec<String>, Vec<std::collections::BTreeMap<String, String>>) {
        let mut r = ::csv::Reader::from_path(path).unwrap();
        let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
        let rows = r
            .records()
            .map(|rec| {
                header
                    .iter()
                    .cloned()
                    .zip(rec.unwrap().iter().map(String::from))
                    .collect()
            })
            .collect();
        (header, rows)
    }

    #[test]
    fn header_then_rows_with_codecarbon_units() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.csv");
        append_energy_csv(&path, &report(10)).unwrap();
        append_energy_csv(&path, &report(20)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        let header = split_csv_line(text.lines().next().unwrap());
        assert_eq!(header, CSV_COLUMNS);
        assert_eq!(CSV_COLUMNS[CODECARBON_COLUMNS - 1], "wue");
        assert_eq!(CSV_COLUMNS[CODECARBON_COLUMNS], "method");
        let (_, rows) = read(&path);
        let row = &rows[0];
        let num = |k: &str| row[k].parse::<f64>().unwrap_or_else(|e| panic!("{k}: {e}"));
        assert_eq!(row["project_name"], "proj, with comma");
        // The window's end: start 1_700_000_000 + 100 s.
        assert_eq!(row["timestamp"], "2023-11-14T22:15:00Z");
        assert_eq!(
            row["experiment_id"],
            crate::util::experiment_uuid("proj, with comma")
        );
        assert_eq!(row["method"], "estimated:cpu-time*tdp");
        assert_eq!(row["country_iso_code"], "FRA");
        assert_eq!(row["images"], "10");
        assert_eq!(rows[1]["images"], "20");
        assert_eq!(row["scope"], "mica process");
        assert_eq!(row["not_measured"], "");
        assert_eq!(row["on_cloud"], "N");
        assert_eq!(num("gpu_count"), 0.0);
        assert!(num("cpu_count") >= 1.0);
        if crate::util::host_info().mem_total_gb.is_some() {
            assert!(num("ram_total_size") > 0.0);
        }
        assert!(row["os"].contains(std::env::consts::ARCH));
        let intensity = num("carbon_intensity_g_per_kwh");
        assert!((num("emissions") - 2.25 * intensity / 1000.0).abs() < 1e-9);
        assert!((num("emissions_rate") - num("emissions") / 100.0).abs() < 1e-15);
    }

    /// CodeCarbon 3.3.2's `_do_measurements`: `power *= pue; energy *= pue`, then each is
    /// accumulated per component and into the total.
    #[test]
    fn pue_scales_every_energy_and_power_column_like_codecarbon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.csv");
        append_energy_csv(&path, &report(1)).unwrap();
        let (_, rows) = read(&path);
        let num = |k: &str| rows[0][k].parse::<f64>().unwrap();
        assert_eq!(num("pue"), 1.5);
        // 1 kWh (3.6 MJ) at the CPU, 0.5 kWh at the RAM, over 100 s.
        assert_eq!(num("cpu_energy"), 1.5);
        assert_eq!(num("ram_energy"), 0.75);
        assert_eq!(num("gpu_energy"), 0.0);
        assert_eq!(num("energy_consumed"), 2.25);
        assert_eq!(num("cpu_power"), 36_000.0 * 1.5);
        assert_eq!(num("ram_power"), 18_000.0 * 1.5);
        let parts = num("cpu_energy") + num("gpu_energy") + num("ram_energy");
        assert!((num("energy_consumed") - parts).abs() < 1e-12);
        let from_power =
            (num("cpu_power") + num("gpu_power") + num("ram_power")) * num("duration") / 3.6e6;
        assert!((num("energy_consumed") - from_power).abs() < 1e-12);
        assert_eq!(num("water_consumed"), 0.0);
    }

    #[test]
    fn gpu_columns_count_the_measured_gpus_only() {
        let gpu = |label: &str, method| ComponentEnergy {
            component: Component::Gpu,
            label: label.into(),
            method,
            joules: 36_000.0,
        };
        let mut r = report_with(
            1,
            vec![
                gpu("gpu0 NVIDIA H100 80GB HBM3", Method::MeasuredNvml),
                gpu("gpu3 NVIDIA H100 80GB HBM3", Method::MeasuredNvml),
                gpu("gpu5 NVIDIA A100-SXM4-40GB", Method::SampledNvmlPower),
            ],
        );
        // Eight visible, three measured.
        r.gpu = Some(crate::report::GpuReport {
            model: "8 x NVIDIA H100 80GB HBM3".into(),
            count: 8,
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.csv");
        append_energy_csv(&path, &r).unwrap();
        let (_, rows) = read(&path);
        assert_eq!(rows[0]["gpu_count"], "3");
        assert_eq!(
            rows[0]["gpu_model"],
            "2 x NVIDIA H100 80GB HBM3, 1 x NVIDIA A100-SXM4-40GB"
        );
        assert_eq!(rows[0]["gpu_energy"].parse::<f64>().unwrap(), 0.03 * 1.5);
    }

    #[test]
    fn an_older_mica_file_gets_rows_under_its_own_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.csv");
        let old: Vec<&str> = CSV_COLUMNS[..CSV_COLUMNS.len() - 2].to_vec();
        std::fs::write(&path, format!("{}\n", old.join(","))).unwrap();
        append_energy_csv(&path, &report(7)).unwrap();
        let (header, rows) = read(&path);
        assert_eq!(header, old);
        assert_eq!(rows[0]["images"], "7");
        assert_eq!(rows[0]["energy_consumed"], "2.25");
    }

    #[test]
    fn not_measured_parts_are_named_in_the_row() {
        let r = report_with(
            1,
            vec![ComponentEnergy {
                component: Component::Cpu,
                label: "local server on port 11434".into(),
                method: Method::NotMeasuredLocalServer,
                joules: 0.0,
            }],
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("energy.csv");
        append_energy_csv(&path, &r).unwrap();
        let (_, rows) = read(&path);
        assert_eq!(
            rows[0]["not_measured"],
            "local server on port 11434 (not-measured:local-server)"
        );
        assert_eq!(
            rows[0]["method"],
            "estimated:cpu-time*tdp+not-measured:local-server"
        );
        assert_eq!(rows[0]["energy_consumed"], "2.25");
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
