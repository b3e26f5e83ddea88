//! The estimate used when no counter is readable: CodeCarbon 3.3.2's process mode.
//!
//! CPU: `power = TDP x cpu_load% / cpu_count / 100` with `cpu_load` the process's CPU time over
//! wall time, so over a window `E_cpu = process_cpu_seconds x TDP / threads` (the wall time
//! cancels). RAM: `E_ram = P_ram(process RSS) x wall_seconds`, with P_ram from CodeCarbon's
//! DIMM-count model (5 W per x86 DIMM, at least 2 DIMMs; 1.5 W per ARM DIMM, at least 3 W).
//! Every figure is labelled `estimated:cpu-time*tdp` and the report names the TDP assumed.
//!
//! With a local model server ([`ProcessTarget::LocalServer`]) the server's process tree is
//! added to mica's; where the server cannot be attributed the whole machine's CPU time
//! (`/proc/stat`) is used instead, labelled `estimated:machine-cpu-time*tdp` (CodeCarbon's
//! machine mode: RAM from the machine's total memory); where not even that is readable the
//! server is reported as `not-measured:local-server`, outside the totals.

use std::path::PathBuf;

use crate::local::{machine_cpu_seconds, machine_memory_bytes, tree_usage};
use crate::meter::{
    Component, ComponentEnergy, Delta, EnergyMeter, MeterDetails, Method, Snapshot, SCOPE_MACHINE,
    SCOPE_MICA,
};
use crate::tdp::CpuSpec;
use crate::EnergyError;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Whose CPU time and memory the estimate covers.
#[derive(Debug, Clone, PartialEq)]
pub enum ProcessTarget {
    /// mica's process: its threads, and its children once waited for.
    Mica,
    /// mica plus the process trees rooted at `pids`: a local model server found from the
    /// socket listening on `port`. `pids` equal to mica's own pid means the server runs inside
    /// mica (a test server), which mica's own time already covers.
    LocalServer {
        port: u16,
        pids: Vec<u32>,
        proc_root: PathBuf,
    },
    /// Every process on the machine (`/proc/stat`), because the local server on `port` could
    /// not be attributed; `reason` says why.
    Machine {
        port: u16,
        proc_root: PathBuf,
        reason: String,
    },
    /// A local server nothing here can measure: mica's process is estimated and the server is
    /// reported as `not-measured:local-server`, outside the totals.
    ServerNotMeasured { port: u16, reason: String },
}

/// CPU and/or RAM estimate for mica's process, or for what a [`ProcessTarget`] names.
pub struct CpuTimeMeter {
    cpu: CpuSpec,
    include_cpu: bool,
    arm: bool,
    target: ProcessTarget,
    pid: u32,
}

impl CpuTimeMeter {
    /// CPU and RAM: for machines without any counter.
    pub fn new(cpu: CpuSpec) -> Self {
        CpuTimeMeter {
            cpu,
            include_cpu: true,
            arm: cfg!(any(target_arch = "arm", target_arch = "aarch64")),
            target: ProcessTarget::Mica,
            pid: std::process::id(),
        }
    }

    /// The same estimate over another set of processes (a local server, the machine).
    pub fn with_target(mut self, target: ProcessTarget) -> Self {
        self.target = target;
        self
    }

    pub fn target(&self) -> &ProcessTarget {
        &self.target
    }

    /// What the figures cover, in words: `mica process`, `mica + local server pid 1234
    /// (port 11434)`, `machine-wide`, ...
    pub fn scope(&self) -> String {
        match &self.target {
            ProcessTarget::Mica => SCOPE_MICA.into(),
            ProcessTarget::LocalServer { port, pids, .. } if pids == &[self.pid] => {
                format!("{SCOPE_MICA} (which is itself the local server on port {port})")
            }
            ProcessTarget::LocalServer { port, pids, .. } => format!(
                "mica + local server pid {} (port {port})",
                pids.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ProcessTarget::Machine { .. } => SCOPE_MACHINE.into(),
            ProcessTarget::ServerNotMeasured { port, .. } => {
                format!("{SCOPE_MICA} (local server on port {port} NOT measured)")
            }
        }
    }

    /// Method of the counted figures: machine-wide CPU time has its own label.
    fn method(&self) -> Method {
        match (&self.target, self.include_cpu) {
            (_, false) => Method::EstimatedRamDimm,
            (ProcessTarget::Machine { .. }, true) => Method::EstimatedMachineCpuTimeTdp,
            (_, true) => Method::EstimatedCpuTimeTdp,
        }
    }

    /// RAM only: next to RAPL without a DRAM domain, labelled `estimated:ram-dimm`.
    pub fn ram_only(cpu: CpuSpec) -> Self {
        CpuTimeMeter {
            include_cpu: false,
            ..CpuTimeMeter::new(cpu)
        }
    }

    pub fn cpu(&self) -> &CpuSpec {
        &self.cpu
    }

    /// Joules for `cpu_seconds` of process CPU time: CodeCarbon's process-mode formula.
    pub fn cpu_joules(&self, cpu_seconds: f64) -> f64 {
        cpu_seconds.max(0.0) * self.cpu.tdp_w / self.cpu.threads as f64
    }

    /// RAM power in watts for a process of `gb` GiB resident.
    pub fn ram_watts(&self, gb: f64) -> f64 {
        ram_power_w(gb, self.arm)
    }
}

/// CodeCarbon 3.3.2 `RAM._calculate_ram_power` (with `_estimate_dimm_count`).
pub fn ram_power_w(memory_gb: f64, arm: bool) -> f64 {
    let dimms = estimate_dimm_count(memory_gb) as f64;
    let (per_dimm, min_power) = if arm { (1.5, 3.0) } else { (5.0, 10.0) };
    let total = if dimms <= 4.0 {
        per_dimm * dimms
    } else if dimms <= 8.0 {
        per_dimm * 4.0 + per_dimm * 0.9 * (dimms - 4.0)
    } else if dimms <= 16.0 {
        per_dimm * 4.0 + per_dimm * 0.9 * 4.0 + per_dimm * 0.8 * (dimms - 8.0)
    } else {
        per_dimm * 4.0
            + per_dimm * 0.9 * 4.0
            + per_dimm * 0.8 * 8.0
            + per_dimm * 0.7 * (dimms - 16.0)
    };
    total.max(min_power)
}

fn estimate_dimm_count(total_gb: f64) -> u32 {
    if total_gb <= 2.0 {
        return 1;
    }
    if total_gb <= 32.0 {
        return if total_gb <= 16.0 { 2 } else { 4 };
    }
    if total_gb <= 128.0 {
        return if total_gb <= 64.0 { 4 } else { 8 };
    }
    for size in [128.0, 64.0, 32.0, 16.0, 8.0, 4.0] {
        if size <= total_gb / 8.0 {
            return ((total_gb / size).ceil() as u32).min(32);
        }
    }
    8
}

/// User + system CPU seconds of this process (all threads) plus its waited-for children.
pub(crate) fn process_cpu_seconds() -> Result<f64, EnergyError> {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage writes into the zeroed struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut ru) } != 0 {
            return Err(EnergyError::Read(format!(
                "getrusage: {}",
                std::io::Error::last_os_error()
            )));
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        total += tv(ru.ru_utime) + tv(ru.ru_stime);
    }
    Ok(total)
}

/// Resident set size of this process in bytes (`/proc/self/statm`); 0 where unreadable.
fn rss_bytes() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else {
        return 0.0;
    };
    let pages: f64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(4096) as f64
}

impl CpuTimeMeter {
    /// (CPU seconds, memory bytes) of the target, and the part of them that is not mica's.
    fn usage(&self) -> Result<[f64; 4], EnergyError> {
        let own_cpu = || -> Result<f64, EnergyError> {
            if self.include_cpu {
                process_cpu_seconds()
            } else {
                Ok(0.0)
            }
        };
        Ok(match &self.target {
            ProcessTarget::Mica | ProcessTarget::ServerNotMeasured { .. } => {
                [own_cpu()?, rss_bytes(), 0.0, 0.0]
            }
            ProcessTarget::LocalServer {
                pids, proc_root, ..
            } => {
                let t = tree_usage(proc_root, pids, self.pid)?;
                let cpu = if self.include_cpu { t.cpu_s } else { 0.0 };
                [
                    own_cpu()? + cpu,
                    rss_bytes() + t.rss_bytes,
                    cpu,
                    t.rss_bytes,
                ]
            }
            ProcessTarget::Machine { proc_root, .. } => {
                let cpu = if self.include_cpu {
                    machine_cpu_seconds(proc_root)?
                } else {
                    0.0
                };
                let mem = machine_memory_bytes(proc_root).unwrap_or(0.0);
                [cpu, mem, cpu, mem]
            }
        })
    }
}

impl EnergyMeter for CpuTimeMeter {
    fn name(&self) -> &'static str {
        if self.include_cpu {
            "cpu-time"
        } else {
            "ram-estimate"
        }
    }

    fn describe(&self) -> String {
        let (who, ram) = match &self.target {
            ProcessTarget::Machine { .. } => (
                "machine-wide CPU time (/proc/stat)".to_string(),
                "RAM = machine's total memory -> DIMM-count power x wall time",
            ),
            ProcessTarget::LocalServer { .. } => (
                format!("CPU time of {}", self.scope()),
                "RAM = resident memory of those processes -> DIMM-count power x wall time",
            ),
            _ => (
                format!("CPU time of {}", self.scope()),
                "RAM = process RSS -> DIMM-count power x wall time",
            ),
        };
        if self.include_cpu {
            format!(
                "{who} x {:.1} W TDP / {} threads ({}, TDP {}); {ram}",
                self.cpu.tdp_w,
                self.cpu.threads,
                self.cpu.model,
                self.cpu.tdp_source.describe()
            )
        } else {
            format!("{ram} ({})", self.scope())
        }
    }

    /// Values: CPU seconds and memory bytes of the target, then the part of each that is the
    /// local server's (or the machine's).
    fn read(&self) -> Result<Snapshot, EnergyError> {
        Ok(Snapshot::new(self.usage()?.to_vec()))
    }

    fn delta(&self, start: &Snapshot, end: &Snapshot) -> Delta {
        let wall = end.at.saturating_duration_since(start.at).as_secs_f64();
        let gb = start.values[1].max(end.values[1]) / GIB;
        let method = self.method();
        let mut components = Vec::new();
        let mut notes = Vec::new();
        let who = match &self.target {
            ProcessTarget::Mica | ProcessTarget::ServerNotMeasured { .. } => "process".to_string(),
            ProcessTarget::LocalServer { .. } => self.scope(),
            ProcessTarget::Machine { .. } => "machine".to_string(),
        };
        if self.include_cpu {
            components.push(ComponentEnergy {
                component: Component::Cpu,
                label: who.clone(),
                method,
                joules: self.cpu_joules(end.values[0] - start.values[0]),
            });
        }
        let memory = if matches!(self.target, ProcessTarget::Machine { .. }) {
            "total"
        } else {
            "resident"
        };
        components.push(ComponentEnergy {
            component: Component::Ram,
            label: format!("{who} ({gb:.2} GiB {memory})"),
            method,
            joules: self.ram_watts(gb) * wall,
        });
        if let ProcessTarget::ServerNotMeasured { port, reason } = &self.target {
            components.push(ComponentEnergy {
                component: if self.include_cpu {
                    Component::Cpu
                } else {
                    Component::Ram
                },
                label: format!("local server on port {port}"),
                method: Method::NotMeasuredLocalServer,
                joules: 0.0,
            });
            notes.push(format!(
                "local server on port {port}: {} energy NOT MEASURED ({reason}); it is not in the totals",
                if self.include_cpu { "CPU and RAM" } else { "RAM" }
            ));
        }
        Delta { components, notes }
    }

    fn details(&self) -> MeterDetails {
        let mut warnings = Vec::new();
        if self.include_cpu {
            warnings.push(format!(
                "ESTIMATE, not a measurement: no readable energy counter, so CPU energy = {} CPU time x {:.1} W / {} threads ({}); TDP-based estimates have deviated from -60 % to +190 % of RAPL readings (CodeCarbon's accuracy notes)",
                match self.target {
                    ProcessTarget::Machine { .. } => "machine-wide",
                    _ => "process",
                },
                self.cpu.tdp_w,
                self.cpu.threads,
                self.cpu.tdp_source.describe()
            ));
            if self.cpu.tdp_source.is_fallback() {
                warnings.push(format!(
                    "CPU model `{}` has no TDP in the table; assumed {:.1} W. Pass --tdp W (or --cpu-model NAME) for a better estimate",
                    self.cpu.model, self.cpu.tdp_w
                ));
            }
            if self.cpu.virtual_machine
                && matches!(self.cpu.tdp_source, crate::TdpSource::Table { .. })
            {
                warnings.push(format!(
                    "virtual machine: the table TDP is the host chip's, shared here among only {} visible threads; the estimate may be too high. Pass --tdp with this VM's share",
                    self.cpu.threads
                ));
            }
        } else {
            warnings.push(
                "RAM energy is estimated (RAPL has no DRAM domain here): DIMM-count power x wall time".into(),
            );
        }
        match &self.target {
            ProcessTarget::Machine { port, reason, .. } => warnings.push(format!(
                "local server on port {port} not attributable ({reason}): the {} of EVERY process on this machine is counted, so other work running meanwhile inflates the figure",
                if self.include_cpu { "CPU time and memory" } else { "memory" }
            )),
            ProcessTarget::ServerNotMeasured { port, reason } => warnings.push(format!(
                "local server on port {port} NOT MEASURED ({reason}): the totals cover mica's process only; do not compare this row's energy with others"
            )),
            _ => {}
        }
        MeterDetails {
            cpu: Some(self.cpu.clone()),
            tracking_mode: Some(match self.target {
                ProcessTarget::Machine { .. } => "machine",
                _ => "process",
            }),
            // Next to RAPL (RAM only) the counters set the scope.
            scope: self.include_cpu.then(|| self.scope()),
            warnings,
            ..MeterDetails::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tdp::resolve_cpu_with;
    use std::time::{Duration, Instant};

    fn meter(tdp: f64, threads: usize) -> CpuTimeMeter {
        let mut m = CpuTimeMeter::new(resolve_cpu_with(
            Some("Test CPU".into()),
            Some(tdp),
            threads,
            1,
            false,
            None,
        ));
        m.arm = false;
        m
    }

    #[test]
    fn cpu_formula_on_known_cpu_times() {
        let m = meter(100.0, 4);
        // 10 CPU-seconds at 25 W per thread.
        assert_eq!(m.cpu_joules(10.0), 250.0);
        assert_eq!(m.cpu_joules(-1.0), 0.0);
        let t0 = Instant::now();
        let start = Snapshot::at(t0, vec![2.0, 0.5 * GIB]);
        let end = Snapshot::at(t0 + Duration::from_secs(20), vec![12.0, 1.5 * GIB]);
        let d = m.delta(&start, &end);
        assert_eq!(d.components.len(), 2);
        assert_eq!(d.components[0].joules, 250.0);
        assert_eq!(d.components[0].method, Method::EstimatedCpuTimeTdp);
        // RAM: 1.5 GiB -> one DIMM -> the 10 W x86 minimum, for 20 s of wall time.
        assert_eq!(d.components[1].component, Component::Ram);
        assert!((d.components[1].joules - 200.0).abs() < 1e-9);
    }

    #[test]
    fn ram_model_matches_codecarbon() {
        assert_eq!(ram_power_w(1.0, false), 10.0);
        assert_eq!(ram_power_w(16.0, false), 10.0);
        assert_eq!(ram_power_w(24.0, false), 20.0);
        assert_eq!(ram_power_w(100.0, false), 5.0 * 4.0 + 5.0 * 0.9 * 4.0);
        // 1 TiB: 8 x 128 GB DIMMs.
        assert_eq!(ram_power_w(1024.0, false), 5.0 * 4.0 + 5.0 * 0.9 * 4.0);
        assert_eq!(ram_power_w(1.0, true), 3.0);
    }

    #[test]
    fn reads_real_process_time_and_labels_it() {
        let m = meter(8.0, 2);
        let s = m.read().unwrap();
        // Spin so CPU time certainly advances.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let e = m.read().unwrap();
        assert!(e.values[0] > s.values[0]);
        assert!(e.values[1] > 0.0, "RSS is read");
        let d = m.delta(&s, &e);
        assert!(d.components[0].joules > 0.0);
        assert!(m.details().warnings[0].starts_with("ESTIMATE"));
    }

    #[test]
    fn ram_only_is_labelled_separately() {
        let m = CpuTimeMeter::ram_only(resolve_cpu_with(None, None, 2, 1, false, None));
        let t0 = Instant::now();
        let d = m.delta(
            &Snapshot::at(t0, vec![0.0, GIB]),
            &Snapshot::at(t0 + Duration::from_secs(1), vec![0.0, GIB]),
        );
        assert_eq!(d.components.len(), 1);
        assert_eq!(d.components[0].method, Method::EstimatedRamDimm);
    }
}
