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

use crate::estimate::{CpuTimeMeter, ProcessTarget};
use crate::local::{find_local_server, machine_cpu_seconds, LocalServer, ServerLookup};
use crate::nvml::{GpuAttribution, NvmlMeter};
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
    /// The whole machine's non-idle CPU time (`/proc/stat`) x TDP share plus a RAM term
    /// (CodeCarbon's machine mode): used when a local model server's process cannot be found,
    /// so it covers every process on the machine.
    #[serde(rename = "estimated:machine-cpu-time*tdp")]
    EstimatedMachineCpuTimeTdp,
    /// RAM power from the DIMM-count model, used next to RAPL when it has no DRAM domain.
    #[serde(rename = "estimated:ram-dimm")]
    EstimatedRamDimm,
    /// Energy spent at a remote API provider: unknown, never counted in totals.
    #[serde(rename = "not-measured:remote-api")]
    NotMeasuredRemoteApi,
    /// Energy of a model server on this machine that nothing here can measure (no RAPL and no
    /// readable `/proc`): never counted in totals, and the report's `not_measured` names it.
    #[serde(rename = "not-measured:local-server")]
    NotMeasuredLocalServer,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::MeasuredRapl => "measured:rapl",
            Method::MeasuredNvml => "measured:nvml",
            Method::SampledNvmlPower => "measured:nvml-power-sampled",
            Method::EstimatedCpuTimeTdp => "estimated:cpu-time*tdp",
            Method::EstimatedMachineCpuTimeTdp => "estimated:machine-cpu-time*tdp",
            Method::EstimatedRamDimm => "estimated:ram-dimm",
            Method::NotMeasuredRemoteApi => "not-measured:remote-api",
            Method::NotMeasuredLocalServer => "not-measured:local-server",
        }
    }

    pub fn is_estimate(self) -> bool {
        matches!(
            self,
            Method::EstimatedCpuTimeTdp
                | Method::EstimatedMachineCpuTimeTdp
                | Method::EstimatedRamDimm
        )
    }

    /// Energy that exists but is unknown: the totals leave out something that was spent.
    pub fn is_not_measured(self) -> bool {
        matches!(
            self,
            Method::NotMeasuredRemoteApi | Method::NotMeasuredLocalServer
        )
    }

    /// Whether the figure enters energy and CO2 totals.
    pub fn counts_in_totals(self) -> bool {
        !self.is_not_measured()
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

/// [`MeterDetails::scope`] of counters that see every process (RAPL, `/proc/stat`).
pub const SCOPE_MACHINE: &str = "machine-wide";
/// [`MeterDetails::scope`] of mica's own process time.
pub const SCOPE_MICA: &str = "mica process";

/// Static facts about what a meter assumes, for the report (TDP, CPU model, GPU model).
#[derive(Debug, Clone, Default)]
pub struct MeterDetails {
    pub cpu: Option<CpuSpec>,
    pub gpu_model: Option<String>,
    pub gpu_count: usize,
    /// CodeCarbon's `tracking_mode`: `process` for the CPU-time estimate, `machine` for
    /// counters that see every process on the package or device.
    pub tracking_mode: Option<&'static str>,
    /// Which processes the CPU/RAM figure covers ([`SCOPE_MACHINE`], [`SCOPE_MICA`],
    /// `mica + local server pid N (port P)`); GPU meters say which devices they count. Merged
    /// into the report's `scope`.
    pub scope: Option<String>,
    /// Seconds between background reads of the counters, where a thread samples them.
    pub sampling_period_s: Option<f64>,
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
    /// A model server on this machine whose energy belongs to the measured work (an LLM
    /// served by Ollama, vLLM or llama.cpp). `None`: only mica's own work is measured.
    pub local_server: Option<LocalServer>,
    /// Where `/proc` lives; tests point it at a fake tree.
    pub proc_root: PathBuf,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            powercap_root: PathBuf::from("/sys/class/powercap"),
            try_nvml: true,
            tdp_w: None,
            cpu_model: None,
            local_server: None,
            proc_root: crate::local::default_proc_root(),
        }
    }
}

/// The meters chosen for this machine, plus the ones that were not and why.
pub struct MeterSet {
    meters: Vec<Box<dyn EnergyMeter>>,
    unavailable: Vec<Unavailable>,
    /// Facts about the set as a whole (where a local server was found), added to every
    /// window's warnings.
    notes: Vec<String>,
}

/// What a local server configuration resolves to: whose CPU time to estimate and which
/// processes' GPU contexts to look for.
fn resolve_server(cfg: &MeterConfig, server: LocalServer) -> (ProcessTarget, Vec<u32>, String) {
    let port = server.port;
    match find_local_server(&cfg.proc_root, port) {
        ServerLookup::Found { pids, names } => {
            let who: Vec<String> = pids
                .iter()
                .zip(&names)
                .map(|(p, n)| {
                    if n.is_empty() {
                        format!("pid {p}")
                    } else {
                        format!("pid {p} ({n})")
                    }
                })
                .collect();
            (
                ProcessTarget::LocalServer {
                    port,
                    pids: pids.clone(),
                    proc_root: cfg.proc_root.clone(),
                },
                pids,
                format!(
                    "local server on port {port}: {} and its child processes, found from the listening socket",
                    who.join(", ")
                ),
            )
        }
        ServerLookup::NotFound(reason) => match machine_cpu_seconds(&cfg.proc_root) {
            Ok(_) => (
                ProcessTarget::Machine {
                    port,
                    proc_root: cfg.proc_root.clone(),
                    reason: reason.clone(),
                },
                Vec::new(),
                format!("local server on port {port}: process not found ({reason})"),
            ),
            Err(e) => {
                let reason = format!("{reason}; machine-wide CPU time unreadable too ({e})");
                (
                    ProcessTarget::ServerNotMeasured {
                        port,
                        reason: reason.clone(),
                    },
                    Vec::new(),
                    format!("local server on port {port}: {reason}"),
                )
            }
        },
    }
}

impl MeterSet {
    pub fn new(meters: Vec<Box<dyn EnergyMeter>>, unavailable: Vec<Unavailable>) -> Self {
        MeterSet {
            meters,
            unavailable,
            notes: Vec::new(),
        }
    }

    /// Facts about the set as a whole (where a local server was found, or why not).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Picks the best available meters: RAPL for CPU (and DRAM), NVML for GPUs, and the
    /// CPU-time estimate only for what no counter covers. Each meter that is not used is
    /// recorded with its reason, so the fallback is never silent.
    ///
    /// With [`MeterConfig::local_server`] the server's share is measured too: RAPL already
    /// covers it (machine-wide); NVML counts whole devices where the server (or mica) holds a
    /// context, else every visible GPU; the CPU-time estimate adds the server's process tree,
    /// or falls back to machine-wide CPU time, or, where nothing is readable, reports the
    /// server as `not-measured:local-server`. The server is looked up once, here.
    pub fn auto(cfg: &MeterConfig) -> MeterSet {
        let mut meters: Vec<Box<dyn EnergyMeter>> = Vec::new();
        let mut unavailable = Vec::new();
        let mut notes = Vec::new();
        let cpu = resolve_cpu(cfg.cpu_model.as_deref(), cfg.tdp_w);
        let (target, server_pids) = match cfg.local_server {
            Some(server) => {
                let (target, pids, note) = resolve_server(cfg, server);
                notes.push(note);
                (target, Some((server.port, pids)))
            }
            None => (ProcessTarget::Mica, None),
        };

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
                    meters.push(Box::new(
                        CpuTimeMeter::ram_only(cpu.clone()).with_target(target.clone()),
                    ));
                }
            }
            None => meters.push(Box::new(
                CpuTimeMeter::new(cpu.clone()).with_target(target.clone()),
            )),
        }

        let attribution = match &server_pids {
            Some((port, pids)) => GpuAttribution::LocalServer {
                port: *port,
                pids: pids.clone(),
                proc_root: cfg.proc_root.clone(),
            },
            None => GpuAttribution::Mica,
        };
        let nvml_missing = if cfg.try_nvml {
            match NvmlMeter::open_with(attribution) {
                Ok(m) => {
                    meters.push(Box::new(m));
                    None
                }
                Err(reason) => Some(reason),
            }
        } else {
            Some("not tried (disabled by configuration)".to_string())
        };
        if let Some(reason) = nvml_missing {
            if let Some((port, _)) = server_pids {
                notes.push(format!(
                    "local server on port {port}: no NVIDIA GPU is measured (NVML {reason}); if the server runs on a GPU, that energy is not in these figures"
                ));
            }
            unavailable.push(Unavailable {
                meter: "nvml".into(),
                reason,
            });
        }
        MeterSet {
            meters,
            unavailable,
            notes,
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
        let mut gpu_scope: Option<String> = None;
        for ((meter, s), e) in self.set.meters.iter().zip(&self.start).zip(&end) {
            let d = meter.delta(s, e);
            components.extend(d.components);
            notes.extend(d.notes);
            let md = meter.details();
            let is_gpu = md.gpu_model.is_some();
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
            if let Some(sc) = md.scope {
                if is_gpu {
                    gpu_scope = Some(sc);
                } else if details.scope.as_deref() != Some(SCOPE_MACHINE) {
                    // The widest CPU/RAM scope wins: a machine-wide counter covers the rest.
                    details.scope = Some(sc);
                }
            }
            if details.sampling_period_s.is_none() {
                details.sampling_period_s = md.sampling_period_s;
            }
            for w in md.warnings {
                if !details.warnings.contains(&w) {
                    details.warnings.push(w);
                }
            }
        }
        let cpu_scope = details
            .scope
            .take()
            .unwrap_or_else(|| SCOPE_MICA.to_string());
        details.scope = Some(match gpu_scope {
            Some(g) => format!("{cpu_scope}; GPU: {g}"),
            None => cpu_scope,
        });
        for n in &self.set.notes {
            if !details.warnings.contains(n) {
                details.warnings.push(n.clone());
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
    /// What the CPU/RAM figures cover and, after `; GPU:`, which GPUs are counted (see
    /// [`MeterDetails::scope`]).
    pub fn scope(&self) -> String {
        self.details
            .scope
            .clone()
            .unwrap_or_else(|| SCOPE_MICA.to_string())
    }

    /// Components whose energy exists but is not measured (never in the totals), as
    /// `label (method)`.
    pub fn not_measured(&self) -> Vec<String> {
        self.components
            .iter()
            .filter(|c| c.method.is_not_measured())
            .map(|c| format!("{} ({})", c.label, c.method.label()))
            .collect()
    }

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
            ..MeterConfig::default()
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
        assert_eq!(m.scope(), SCOPE_MICA);
        assert!(m.not_measured().is_empty());
    }

    use crate::local::clock_ticks_per_s;
    use crate::local::tests::FakeProc;
    use crate::report::EnergyReport;
    use crate::CarbonConfig;
    use std::path::Path;

    /// No RAPL, no NVML, a fake /proc, 100 W TDP.
    fn server_config(proc_root: &Path, powercap: &Path) -> MeterConfig {
        MeterConfig {
            powercap_root: powercap.to_path_buf(),
            try_nvml: false,
            tdp_w: Some(100.0),
            local_server: Some(LocalServer { port: 11434 }),
            proc_root: proc_root.to_path_buf(),
            ..MeterConfig::default()
        }
    }

    fn carbon() -> CarbonConfig {
        CarbonConfig::resolve(Some("FRA"), None, None).unwrap()
    }

    #[test]
    fn a_local_server_found_from_its_port_is_added_to_the_estimate() {
        let p = FakeProc::new();
        p.listen(11434, 5555);
        p.machine(1000, 1000, 8 * 1024 * 1024);
        p.process(1, 0, "init", (1, 1), 1, &[]);
        p.process(300, 1, "ollama", (100, 20), 1000, &[5555]);
        p.process(301, 300, "ollama", (50, 0), 2000, &[]);
        let set = MeterSet::auto(&server_config(p.root(), &p.root().join("no-powercap")));
        assert_eq!(set.meters().len(), 1);
        let meter = &set.meters()[0];
        assert!(
            meter
                .describe()
                .contains("mica + local server pid 300 (port 11434)"),
            "{}",
            meter.describe()
        );
        assert!(
            set.notes()[0].contains("pid 300 (ollama)"),
            "{:?}",
            set.notes()
        );

        // The server part of the snapshot moves by exactly the server tree's ticks.
        let s = meter.read().unwrap();
        p.set_ticks(300, 1, "ollama", (150, 30), 1000); // +60
        p.set_ticks(301, 300, "ollama", (390, 0), 2000); // +340, a child (the model runner)
        let e = meter.read().unwrap();
        let server_s = 400.0 / clock_ticks_per_s();
        assert_eq!(e.values()[2] - s.values()[2], server_s);
        assert!(
            e.values()[0] - s.values()[0] >= server_s,
            "mica's own time is added"
        );

        let w = set.start().unwrap();
        p.set_ticks(301, 300, "ollama", (590, 0), 2000); // +200
        let m = w.stop().unwrap();
        let cpu = m
            .components
            .iter()
            .find(|c| c.component == Component::Cpu)
            .unwrap();
        assert_eq!(cpu.method, Method::EstimatedCpuTimeTdp);
        assert_eq!(cpu.label, "mica + local server pid 300 (port 11434)");
        let threads = m.details.cpu.as_ref().unwrap().threads as f64;
        assert!(cpu.joules >= 200.0 / clock_ticks_per_s() * 100.0 / threads);
        assert_eq!(m.scope(), "mica + local server pid 300 (port 11434)");
        let r = EnergyReport::new("p", &m, &carbon(), 1);
        assert!(r.is_complete());
        assert_eq!(r.scope, "mica + local server pid 300 (port 11434)");
        assert_eq!(r.tracking_mode, "process");
    }

    #[test]
    fn an_unattributable_server_falls_back_to_machine_cpu_time() {
        let p = FakeProc::new();
        p.listen(11434, 5555);
        p.machine(1000, 1000, 16 * 1024 * 1024);
        p.process(300, 1, "bash", (1, 1), 1, &[]);
        let set = MeterSet::auto(&server_config(p.root(), &p.root().join("no-powercap")));
        let w = set.start().unwrap();
        p.machine(1300, 5000, 16 * 1024 * 1024);
        let m = w.stop().unwrap();
        let cpu = m
            .components
            .iter()
            .find(|c| c.component == Component::Cpu)
            .unwrap();
        assert_eq!(cpu.method, Method::EstimatedMachineCpuTimeTdp);
        let threads = m.details.cpu.as_ref().unwrap().threads as f64;
        assert!((cpu.joules - 300.0 / clock_ticks_per_s() * 100.0 / threads).abs() < 1e-9);
        let ram = m
            .components
            .iter()
            .find(|c| c.component == Component::Ram)
            .unwrap();
        assert!(ram.label.contains("16.00 GiB total"), "{}", ram.label);
        assert_eq!(m.method_label(), "estimated:machine-cpu-time*tdp");
        assert_eq!(m.scope(), SCOPE_MACHINE);
        assert_eq!(m.details.tracking_mode, Some("machine"));
        assert!(m
            .details
            .warnings
            .iter()
            .any(|w| w.contains("EVERY process")));
        assert!(m
            .details
            .warnings
            .iter()
            .any(|w| w.contains("held by no process")));
        assert!(EnergyReport::new("p", &m, &carbon(), 1).is_complete());
    }

    #[test]
    fn a_server_nothing_can_measure_is_not_measured_and_out_of_the_totals() {
        let dir = tempfile::tempdir().unwrap();
        let set = MeterSet::auto(&server_config(
            &dir.path().join("no-proc"),
            &dir.path().join("no-powercap"),
        ));
        let m = set.start().unwrap().stop().unwrap();
        let nm = m
            .components
            .iter()
            .find(|c| c.method == Method::NotMeasuredLocalServer)
            .expect("a not-measured component");
        assert_eq!(nm.label, "local server on port 11434");
        assert_eq!(m.method_label(), "estimated:cpu-time*tdp");
        let counted: f64 = m
            .components
            .iter()
            .filter(|c| c.method != Method::NotMeasuredLocalServer)
            .map(|c| c.joules)
            .sum();
        assert_eq!(m.total_joules(), counted);
        assert!(m.scope().contains("NOT measured"), "{}", m.scope());
        let r = EnergyReport::new("p", &m, &carbon(), 3);
        assert!(!r.is_complete());
        assert_eq!(
            r.not_measured,
            ["local server on port 11434 (not-measured:local-server)"]
        );
        assert_eq!(r.method, "estimated:cpu-time*tdp+not-measured:local-server");
        assert!((r.energy_wh - counted / 3600.0).abs() < 1e-12);
        assert!(r.warnings.iter().any(|w| w.contains("NOT MEASURED")));
        assert_eq!(
            serde_json::to_string(&Method::NotMeasuredLocalServer).unwrap(),
            "\"not-measured:local-server\""
        );
        assert!(!Method::NotMeasuredLocalServer.counts_in_totals());
    }

    /// A fake powercap tree with one package (and optionally its DRAM).
    fn powercap(root: &Path, dram: bool) {
        let zone = |id: &str, name: &str| {
            let d = root.join(id);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
            std::fs::write(d.join("energy_uj"), "1000\n").unwrap();
            std::fs::write(d.join("max_energy_range_uj"), "262143328850\n").unwrap();
        };
        zone("intel-rapl:0", "package-0");
        if dram {
            zone("intel-rapl:0:0", "dram");
        }
    }

    #[test]
    fn with_rapl_the_server_is_covered_machine_wide() {
        let p = FakeProc::new();
        p.listen(11434, 5555);
        p.machine(1000, 1000, 8 * 1024 * 1024);
        p.process(300, 1, "llama-server", (1, 1), 1000, &[5555]);
        let pc = tempfile::tempdir().unwrap();
        powercap(pc.path(), true);
        let set = MeterSet::auto(&server_config(p.root(), pc.path()));
        assert_eq!(set.meters().len(), 1);
        assert_eq!(set.meters()[0].name(), "rapl");
        let m = set.start().unwrap().stop().unwrap();
        assert_eq!(m.scope(), SCOPE_MACHINE);
        assert_eq!(m.details.sampling_period_s, Some(10.0));
        assert!(m
            .details
            .warnings
            .iter()
            .any(|w| w.contains("pid 300 (llama-server)")));
        assert!(m
            .details
            .warnings
            .iter()
            .any(|w| w.contains("no NVIDIA GPU is measured")));

        // Without a DRAM domain the RAM estimate covers the server's memory too.
        let pc2 = tempfile::tempdir().unwrap();
        powercap(pc2.path(), false);
        let set = MeterSet::auto(&server_config(p.root(), pc2.path()));
        assert_eq!(set.meters().len(), 2);
        assert!(
            set.meters()[1].describe().contains("local server pid 300"),
            "{}",
            set.meters()[1].describe()
        );
        let m = set.start().unwrap().stop().unwrap();
        assert_eq!(m.scope(), SCOPE_MACHINE);
        assert_eq!(m.method_label(), "measured:rapl+estimated:ram-dimm");
    }

    #[test]
    fn a_real_listener_in_this_process_is_found_through_proc() {
        if !Path::new("/proc/net/tcp").exists() {
            eprintln!("SKIPPED: no /proc/net/tcp (not Linux)");
            return;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = MeterConfig {
            powercap_root: PathBuf::from("/nonexistent-powercap"),
            try_nvml: false,
            tdp_w: Some(100.0),
            local_server: Some(LocalServer {
                port: l.local_addr().unwrap().port(),
            }),
            ..MeterConfig::default()
        };
        let set = MeterSet::auto(&cfg);
        let m = set.start().unwrap().stop().unwrap();
        assert!(
            m.scope()
                .starts_with("mica process (which is itself the local server on port"),
            "{}",
            m.scope()
        );
        assert_eq!(m.method_label(), "estimated:cpu-time*tdp");
        assert!(m.not_measured().is_empty());
    }
}
