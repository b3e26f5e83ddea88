//! The meter contract, measurement windows and automatic meter selection.
//!
//! A meter never owns a "current window": it only reads cumulative counters into a
//! [`Snapshot`] and turns two snapshots into energy. Windows are therefore nestable and
//! independent (a per-classifier window inside a whole-run window), unlike a tracker object whose
//! second start/stop cycle returns frozen or accumulated values.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::estimate::CpuTimeMeter;
use crate::nvml::NvmlMeter;
use crate::rapl::RaplMeter;
use crate::tdp::{resolve_cpu, CpuSpec};
use crate::EnergyError;

/// How a figure was obtained. The serialised form is the label printed in every output, so a
/// reader can always tell a counter reading from an estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Method {
    /// RAPL energy counters (`/sys/class/powercap`).
    #[serde(rename = "measured:rapl")]
    MeasuredRapl,
    /// NVML's total-energy counter (mJ since driver load).
    #[serde(rename = "measured:nvml")]
    MeasuredNvml,
    /// NVML power readings integrated over time: GPUs without the energy counter. Coarser,
    /// since NVML power on A100/H100 covers only part of the run time.
    #[serde(rename = "measured:nvml-power-sampled")]
    SampledNvmlPower,
    /// Process CPU time x TDP share plus a RAM term (CodeCarbon's process mode).
    #[serde(rename = "estimated:cpu-time*tdp")]
    EstimatedCpuTimeTdp,
    /// RAM power from the DIMM-count model, used next to RAPL when it has no DRAM domain.
    #[serde(rename = "estimated:ram-dimm")]
    EstimatedRamDimm,
    /// Energy spent at a remote API provider: unknown, never counted in totals.
    #[serde(rename = "not-measured:remote-api")]
    NotMeasuredRemoteApi,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::MeasuredRapl => "measured:rapl",
            Method::MeasuredNvml => "measured:nvml",
            Method::SampledNvmlPower => "measured:nvml-power-sampled",
            Method::EstimatedCpuTimeTdp => "estimated:cpu-time*tdp",
            Method::EstimatedRamDimm => "estimated:ram-dimm",
            Method::NotMeasuredRemoteApi => "not-measured:remote-api",
        }
    }

    pub fn is_estimate(self) -> bool {
        matches!(self, Method::EstimatedCpuTimeTdp | Method::EstimatedRamDimm)
    }

    /// Whether the figure enters energy and CO2 totals.
    pub fn counts_in_totals(self) -> bool {
        self != Method::NotMeasuredRemoteApi
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The hardware part an energy figure belongs to (the CodeCarbon CSV columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    Cpu,
    Ram,
    Gpu,
    Remote,
}

/// Energy of one component over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentEnergy {
    pub component: Component,
    /// Which domain or device: `package-0`, `dram (package-0)`, `gpu0 NVIDIA H100`, `process`.
    pub label: String,
    pub method: Method,
    pub joules: f64,
}

/// Cumulative counters of one meter at one instant. Opaque to callers: only the meter that
/// produced it can turn two of them into energy.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub(crate) at: Instant,
    pub(crate) values: Vec<f64>,
}

impl Snapshot {
    pub fn new(values: Vec<f64>) -> Self {
        Snapshot {
            at: Instant::now(),
            values,
        }
    }

    /// For tests and custom meters that need a controlled clock.
    pub fn at(at: Instant, values: Vec<f64>) -> Self {
        Snapshot { at, values }
    }

    pub fn values(&self) -> &[f64] {
        &self.values
    }

    pub fn instant(&self) -> Instant {
        self.at
    }
}

/// What one meter says about a window: energy per component and anything the reader should
/// know (a wrapped counter, a mirrored domain dropped).
#[derive(Debug, Clone, Default)]
pub struct Delta {
    pub components: Vec<ComponentEnergy>,
    pub notes: Vec<String>,
}

/// Static facts about what a meter assumes, for the report (TDP, CPU model, GPU model).
#[derive(Debug, Clone, Default)]
pub struct MeterDetails {
    pub cpu: Option<CpuSpec>,
    pub gpu_model: Option<String>,
    pub gpu_count: usize,
    /// CodeCarbon's `tracking_mode`: `process` for the CPU-time estimate, `machine` for
    /// counters that see every process on the package or device.
    pub tracking_mode: Option<&'static str>,
    pub warnings: Vec<String>,
}

/// A source of energy figures. Implementations read cumulative counters only; see the module
/// documentation for why.
pub trait EnergyMeter: Send + Sync {
    /// Short name used in probe output: `rapl`, `nvml`, `cpu-time`.
    fn name(&self) -> &'static str;
    /// One line on what it reads, for `mica energy probe`.
    fn describe(&self) -> String;
    /// Reads the cumulative counters. Must be cheap (well under 1 ms): it runs at both ends of
    /// every window.
    fn read(&self) -> Result<Snapshot, EnergyError>;
    /// Energy between two snapshots taken by this meter, `start` before `end`.
    fn delta(&self, start: &Snapshot, end: &Snapshot) -> Delta;
    fn details(&self) -> MeterDetails {
        MeterDetails::default()
    }
}

/// A meter that could not be used, and why (permission denied, no driver, absent sysfs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unavailable {
    pub meter: String,
    pub reason: String,
}

/// Settings for automatic meter selection.
#[derive(Debug, Clone)]
pub struct MeterConfig {
    /// Where the powercap tree lives; tests point it at a fake tree.
    pub powercap_root: PathBuf,
    /// Skip NVML entirely (tests, or machines where loading the driver library is unwanted).
    pub try_nvml: bool,
    /// CPU TDP in watts, overriding the table lookup.
    pub tdp_w: Option<f64>,
    /// CPU model name used for the TDP lookup, overriding `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            powercap_root: PathBuf::from("/sys/class/powercap"),
            try_nvml: true,
            tdp_w: None,
            cpu_model: None,
        }
    }
}

/// The meters chosen for this machine, plus the ones that were not and why.
pub struct MeterSet {
    meters: Vec<Box<dyn EnergyMeter>>,
    unavailable: Vec<Unavailable>,
}

impl MeterSet {
    pub fn new(meters: Vec<Box<dyn EnergyMeter>>, unavailable: Vec<Unavailable>) -> Self {
        MeterSet {
            meters,
            unavailable,
        }
    }

    /// Picks the best available meters: RAPL for CPU (and DRAM), NVML for GPUs, and the
    /// CPU-time estimate only for what no counter covers. Each meter that is not used is
    /// recorded with its reason, so the fallback is never silent.
    pub fn auto(cfg: &MeterConfig) -> MeterSet {
        let mut meters: Vec<Box<dyn EnergyMeter>> = Vec::new();
        let mut unavailable = Vec::new();
        let cpu = resolve_cpu(cfg.cpu_model.as_deref(), cfg.tdp_w);

        let rapl = match RaplMeter::open(&cfg.powercap_root) {
            Ok(m) => Some(m),
            Err(reason) => {
                unavailable.push(Unavailable {
                    meter: "rapl".into(),
                    reason,
                });
                None
            }
        };
        match rapl {
            Some(r) => {
                let has_dram = r.has_dram();
                meters.push(Box::new(r));
                if !has_dram {
                    meters.push(Box::new(CpuTimeMeter::ram_only(cpu.clone())));
                }
            }
            None => meters.push(Box::new(CpuTimeMeter::new(cpu.clone()))),
        }

        if cfg.try_nvml {
            match NvmlMeter::open() {
                Ok(m) => meters.push(Box::new(m)),
                Err(reason) => unavailable.push(Unavailable {
                    meter: "nvml".into(),
                    reason,
                }),
            }
        } else {
            unavailable.push(Unavailable {
                meter: "nvml".into(),
                reason: "not tried (disabled by configuration)".into(),
            });
        }
        MeterSet {
            meters,
            unavailable,
        }
    }

    pub fn meters(&self) -> &[Box<dyn EnergyMeter>] {
        &self.meters
    }

    pub fn unavailable(&self) -> &[Unavailable] {
        &self.unavailable
    }

    /// Opens a window: reads every meter's counters now.
    pub fn start(&self) -> Result<Window<'_>, EnergyError> {
        let started_at = SystemTime::now();
        let started = Instant::now();
        let start = self
            .meters
            .iter()
            .map(|m| m.read())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Window {
            set: self,
            start,
            started,
            started_at,
        })
    }
}

/// An open measurement window. Holds only the start readings, so any number may be open at
/// once.
pub struct Window<'a> {
    set: &'a MeterSet,
    start: Vec<Snapshot>,
    started: Instant,
    started_at: SystemTime,
}

impl Window<'_> {
    /// Reads the counters again and returns the energy since [`MeterSet::start`].
    pub fn stop(self) -> Result<Measurement, EnergyError> {
        let end = self
            .set
            .meters
            .iter()
            .map(|m| m.read())
            .collect::<Result<Vec<_>, _>>()?;
        let duration = self.started.elapsed();
        let mut components = Vec::new();
        let mut notes = Vec::new();
        let mut details = MeterDetails::default();
        for ((meter, s), e) in self.set.meters.iter().zip(&self.start).zip(&end) {
            let d = meter.delta(s, e);
            components.extend(d.components);
            notes.extend(d.notes);
            let md = meter.details();
            if details.cpu.is_none() {
                details.cpu = md.cpu;
            }
            if md.gpu_model.is_some() {
                details.gpu_model = md.gpu_model;
                details.gpu_count = md.gpu_count;
            }
            // A machine-wide counter anywhere makes the whole window machine-scoped.
            details.tracking_mode = match (details.tracking_mode, md.tracking_mode) {
                (Some("machine"), _) | (_, Some("machine")) => Some("machine"),
                (a, b) => a.or(b),
            };
            for w in md.warnings {
                if !details.warnings.contains(&w) {
                    details.warnings.push(w);
                }
            }
        }
        Ok(Measurement {
            started_at: self.started_at,
            duration,
            components,
            notes,
            details,
            unavailable: self.set.unavailable.clone(),
        })
    }
}

/// The result of one window.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub started_at: SystemTime,
    pub duration: Duration,
    pub components: Vec<ComponentEnergy>,
    pub notes: Vec<String>,
    pub details: MeterDetails,
    pub unavailable: Vec<Unavailable>,
}

impl Measurement {
    /// The distinct method labels of the counted components joined with `+`, e.g.
    /// `estimated:cpu-time*tdp` or `measured:rapl+estimated:ram-dimm`.
    pub fn method_label(&self) -> String {
        let mut methods: Vec<Method> = self
            .components
            .iter()
            .filter(|c| c.method.counts_in_totals())
            .map(|c| c.method)
            .collect();
        methods.sort();
        methods.dedup();
        if methods.is_empty() {
            return "none".into();
        }
        methods
            .iter()
            .map(|m| m.label())
            .collect::<Vec<_>>()
            .join("+")
    }

    /// Total joules of one component kind, counted methods only.
    pub fn joules(&self, component: Component) -> f64 {
        self.components
            .iter()
            .filter(|c| c.component == component && c.method.counts_in_totals())
            .map(|c| c.joules)
            .sum()
    }

    /// Total joules over all counted components.
    pub fn total_joules(&self) -> f64 {
        self.components
            .iter()
            .filter(|c| c.method.counts_in_totals())
            .map(|c| c.joules)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A meter whose counter the test advances by hand.
    struct Manual(Arc<AtomicU64>);

    impl EnergyMeter for Manual {
        fn name(&self) -> &'static str {
            "manual"
        }
        fn describe(&self) -> String {
            "manual counter".into()
        }
        fn read(&self) -> Result<Snapshot, EnergyError> {
            Ok(Snapshot::new(vec![self.0.load(Ordering::SeqCst) as f64]))
        }
        fn delta(&self, s: &Snapshot, e: &Snapshot) -> Delta {
            Delta {
                components: vec![ComponentEnergy {
                    component: Component::Cpu,
                    label: "manual".into(),
                    method: Method::MeasuredRapl,
                    joules: e.values[0] - s.values[0],
                }],
                notes: vec![],
            }
        }
    }

    #[test]
    fn nested_windows_are_independent() {
        let value = Arc::new(AtomicU64::new(0));
        let set = MeterSet::new(vec![Box::new(Manual(value.clone()))], vec![]);
        let counter = |v: u64| value.store(v, Ordering::SeqCst);
        let outer = set.start().unwrap();
        counter(10);
        let inner = set.start().unwrap();
        counter(25);
        let inner_m = inner.stop().unwrap();
        counter(40);
        let second_inner = set.start().unwrap();
        counter(41);
        assert_eq!(second_inner.stop().unwrap().total_joules(), 1.0);
        assert_eq!(inner_m.total_joules(), 15.0);
        assert_eq!(outer.stop().unwrap().total_joules(), 41.0);
    }

    #[test]
    fn method_label_joins_distinct_counted_methods() {
        let comp = |method, joules| ComponentEnergy {
            component: Component::Cpu,
            label: "x".into(),
            method,
            joules,
        };
        let m = Measurement {
            started_at: SystemTime::now(),
            duration: Duration::from_secs(1),
            components: vec![
                comp(Method::EstimatedRamDimm, 1.0),
                comp(Method::MeasuredRapl, 2.0),
                comp(Method::MeasuredRapl, 3.0),
                comp(Method::NotMeasuredRemoteApi, 0.0),
            ],
            notes: vec![],
            details: MeterDetails::default(),
            unavailable: vec![],
        };
        assert_eq!(m.method_label(), "measured:rapl+estimated:ram-dimm");
        assert_eq!(m.total_joules(), 6.0);
        assert_eq!(
            serde_json::to_string(&Method::EstimatedCpuTimeTdp).unwrap(),
            "\"estimated:cpu-time*tdp\""
        );
    }

    #[test]
    fn auto_on_a_machine_without_counters_estimates_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MeterConfig {
            powercap_root: dir.path().join("absent"),
            try_nvml: false,
            tdp_w: Some(100.0),
            cpu_model: None,
        };
        let set = MeterSet::auto(&cfg);
        assert_eq!(set.meters().len(), 1);
        assert_eq!(set.meters()[0].name(), "cpu-time");
        let rapl = set
            .unavailable()
            .iter()
            .find(|u| u.meter == "rapl")
            .unwrap();
        assert!(rapl.reason.contains("absent"), "{}", rapl.reason);
        let m = set.start().unwrap().stop().unwrap();
        assert_eq!(m.method_label(), "estimated:cpu-time*tdp");
    }
}
