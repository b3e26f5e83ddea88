//! Energy and CO2 for a classifier's run: measured where the hardware has counters, estimated
//! and labelled where it does not, never silently either.
//!
//! The shape follows from the known failures of existing meters (CodeCarbon, Zeus, Eco2AI):
//! every figure carries a [`Method`] label, unavailable counters are reported with the reason
//! (instead of a silent fallback to a TDP constant), RAPL domains are de-duplicated, and a
//! missing country makes the world-average carbon intensity a loud warning.
//!
//! ```no_run
//! use mica_energy::{CarbonConfig, EnergyReport, MeterConfig, MeterSet};
//! let meters = MeterSet::auto(&MeterConfig::default());
//! let window = meters.start().unwrap();
//! // ... classify 100 images ...
//! let measurement = window.stop().unwrap();
//! let carbon = CarbonConfig::resolve(Some("FRA"), None, None).unwrap();
//! let report = EnergyReport::new("brain-mri", &measurement, &carbon, 100);
//! println!("{}", report.summary_line());
//! ```
//!
//! An LLM served on this machine (Ollama, vLLM, llama.cpp) spends its energy outside mica's
//! process; naming its port makes the window cover it, and a server nothing can measure is
//! flagged instead of silently left out:
//!
//! ```no_run
//! use mica_energy::{CarbonConfig, LocalServer, MeterConfig, MeterSet};
//! let cfg = MeterConfig {
//!     local_server: LocalServer::from_base_url("http://localhost:11434/v1"),
//!     ..MeterConfig::default()
//! };
//! let meters = MeterSet::auto(&cfg);
//! let carbon = CarbonConfig::resolve(Some("FRA"), None, None).unwrap();
//! let (_, report) = mica_energy::measure(&meters, &carbon, "brain-mri/llava", || {
//!     // ... ask the server about 100 images ...
//!     Ok::<_, mica_energy::EnergyError>(((), 100))
//! })
//! .unwrap();
//! println!("{} [{}]", report.summary_line(), report.scope);
//! if !report.is_complete() {
//!     eprintln!("not measured: {:?}", report.not_measured);
//! }
//! ```

pub mod carbon;
pub mod csv;
pub mod estimate;
pub mod local;
pub mod meter;
pub mod nvml;
pub mod rapl;
pub mod remote;
pub mod report;
pub mod tdp;
mod util;

pub use carbon::{CarbonConfig, IntensitySource, WORLD_AVERAGE_G_PER_KWH};
pub use csv::{append_energy_csv, CODECARBON_COLUMNS, CSV_COLUMNS};
pub use estimate::{CpuTimeMeter, ProcessTarget};
pub use local::{find_local_server, LocalServer, ServerLookup};
pub use meter::{
    Component, ComponentEnergy, Delta, EnergyMeter, Measurement, MeterConfig, MeterDetails,
    MeterSet, Method, Snapshot, Unavailable, Window, SCOPE_MACHINE, SCOPE_MICA,
};
pub use nvml::{GpuAttribution, NvmlMeter};
pub use rapl::{RaplMeter, SysfsReader};
pub use remote::{PerTokenEstimate, RemoteUsage, EPOCH_AI_GPT4O_2025};
pub use report::{
    measure, ComponentReport, CpuReport, EnergyReport, GpuReport, PerImage, RemoteReport,
};
pub use tdp::{resolve_cpu, CpuSpec, TdpSource};
pub use util::experiment_uuid;

/// Errors of the energy crate. Messages name the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format {
        path: std::path::PathBuf,
        message: String,
    },
    /// A user-supplied setting that cannot mean anything (unknown country, PUE below 1, ...).
    #[error("{0}")]
    Config(String),
    /// A counter that was readable when the meter was chosen failed later.
    #[error("{0}")]
    Read(String),
}

impl EnergyError {
    pub(crate) fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        EnergyError::Io {
            path: path.into(),
            source,
        }
    }
}
