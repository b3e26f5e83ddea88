//! Energy of work that is not a classification run (`mica train`, `mica energy burn --out`),
//! recorded into its directory the same way a run records its windows.

use std::path::Path;

use mica_core::ClassifierDir;
use mica_energy::EnergyReport;

use crate::RunError;

/// Appends a row to `dir/energy.csv`, writes `dir/energy.json`, and puts the report into the
/// `energy` key of `dir/metrics.json` when that file exists.
pub fn record_energy(dir: &Path, report: &EnergyReport) -> Result<(), RunError> {
    std::fs::create_dir_all(dir).map_err(RunError::io(dir))?;
    let files = ClassifierDir::new(dir);
    mica_energy::append_energy_csv(&files.energy_csv(), report)?;
    let json = serde_json::to_vec_pretty(report).expect("energy report serialises");
    mica_core::write_atomic(files.energy_report(), &json)?;
    let metrics_path = files.metrics();
    if metrics_path.is_file() {
        let bytes = std::fs::read(&metrics_path).map_err(RunError::io(&metrics_path))?;
        let mut metrics: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| RunError::Config {
            path: metrics_path.clone(),
            message: format!("not valid JSON ({e}); the energy section was not added"),
        })?;
        let Some(obj) = metrics.as_object_mut() else {
            return Err(RunError::Config {
                path: metrics_path,
                message: "expected a JSON object to add the energy section to".into(),
            });
        };
        obj.insert("energy".into(), serde_json::to_value(report).expect("energy report serialises"));
        let bytes = serde_json::to_vec_pretty(&metrics).expect("JSON value serialises");
        mica_core::write_atomic(&metrics_path, &bytes)?;
    }
    Ok(())
}
