//! NVIDIA GPUs through NVML, loaded at run time (`libnvidia-ml.so.1` is dlopened by
//! `nvml-wrapper`), so every build carries it and machines without a driver get a clean reason.
//!
//! The total-energy counter (mJ since driver load, Volta and newer) is read at both ends of a
//! window. GPUs without it are sampled for power by a background thread that integrates into a
//! cumulative counter (labelled `measured:nvml-power-sampled`), so windows stay nestable.
//! Only GPUs where this process holds a context at either end of the window are counted, as
//! Eco2AI does; whole-device energy is counted for those (other processes on the same GPU are
//! included, as in CodeCarbon).
//!
//! For a local model server ([`GpuAttribution::LocalServer`]) the GPUs where the server's
//! process tree (or mica) holds a context are counted; where NVML shows none of them (the
//! server in a container, whose pids NVML reports from another namespace, or a server on CPU),
//! every visible GPU is counted, and the window's notes say so.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;

use crate::meter::{
    Component, ComponentEnergy, Delta, EnergyMeter, MeterDetails, Method, Snapshot,
};
use crate::EnergyError;

const SAMPLE_PERIOD: Duration = Duration::from_millis(100);

struct Gpu {
    index: u32,
    name: String,
    has_counter: bool,
}

/// Integrates power readings of the GPUs without an energy counter.
struct Sampler {
    stop: Arc<AtomicBool>,
    cumulative_mj: Arc<Mutex<Vec<f64>>>,
    handle: Option<JoinHandle<()>>,
}

/// Whose GPU contexts decide which devices a window counts.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuAttribution {
    /// GPUs where mica's process holds a context.
    Mica,
    /// A local model server: GPUs where a process of the trees rooted at `pids` (or mica)
    /// holds a context, else all visible GPUs. `pids` is empty when the server's process could
    /// not be found, so all visible GPUs are counted.
    LocalServer {
        port: u16,
        pids: Vec<u32>,
        proc_root: PathBuf,
    },
}

pub struct NvmlMeter {
    nvml: Arc<Nvml>,
    gpus: Vec<Gpu>,
    sampler: Option<Sampler>,
    pid: u32,
    attribution: GpuAttribution,
}

/// Which GPUs a window counts, given per GPU whether a relevant process held a context at the
/// window's start or end; `true` in the second value when none did and a local server makes
/// every visible GPU count.
pub fn gpus_to_count(used: &[bool], attribution: &GpuAttribution) -> (Vec<usize>, bool) {
    let chosen: Vec<usize> = (0..used.len()).filter(|&k| used[k]).collect();
    match attribution {
        GpuAttribution::LocalServer { .. } if chosen.is_empty() => {
            ((0..used.len()).collect(), true)
        }
        _ => (chosen, false),
    }
}

/// GPU indices named by `CUDA_VISIBLE_DEVICES` (indices or `GPU-` UUIDs); `None` = all.
fn visible_devices(nvml: &Nvml, count: u32) -> Result<Option<Vec<u32>>, String> {
    let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") else {
        return Ok(None);
    };
    if v.trim().is_empty() {
        return Err("CUDA_VISIBLE_DEVICES is empty: no GPU visible to this process".into());
    }
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim) {
        if let Ok(i) = item.parse::<u32>() {
            if i < count {
                out.push(i);
            }
        } else if let Ok(d) = nvml.device_by_uuid(item) {
            if let Ok(i) = d.index() {
                out.push(i);
            }
        } else {
            // A MIG or otherwise unparsable entry: fall back to every device.
            return Ok(None);
        }
    }
    Ok(Some(out))
}

impl NvmlMeter {
    /// Loads NVML and lists the GPUs this process may use. The error is the reason in words.
    pub fn open() -> Result<NvmlMeter, String> {
        Self::open_with(GpuAttribution::Mica)
    }

    /// [`NvmlMeter::open`], counting the GPUs that `attribution` names.
    pub fn open_with(attribution: GpuAttribution) -> Result<NvmlMeter, String> {
        let nvml = Nvml::init().map_err(|e| {
            let msg = e.to_string();
            if msg.contains("libnvidia-ml") || msg.contains("libloading") {
                format!("no NVIDIA driver (libnvidia-ml.so.1 cannot be loaded: {msg})")
            } else {
                format!("NVML init failed: {msg}")
            }
        })?;
        let count = nvml
            .device_count()
            .map_err(|e| format!("NVML device count: {e}"))?;
        if count == 0 {
            return Err("NVML loaded but reports no GPU".into());
        }
        let indices = visible_devices(&nvml, count)?.unwrap_or_else(|| (0..count).collect());
        let mut gpus = Vec::new();
        for index in indices {
            let d = nvml
                .device_by_index(index)
                .map_err(|e| format!("NVML GPU {index}: {e}"))?;
            let name = d.name().unwrap_or_else(|_| "unknown GPU".into());
            let has_counter = d.total_energy_consumption().is_ok();
            if !has_counter && d.power_usage().is_err() {
                continue;
            }
            gpus.push(Gpu {
                index,
                name,
                has_counter,
            });
        }
        if gpus.is_empty() {
            return Err("NVML: no visible GPU exposes an energy counter or power reading".into());
        }
        let nvml = Arc::new(nvml);
        let sampler = gpus.iter().any(|g| !g.has_counter).then(|| {
            start_sampler(
                nvml.clone(),
                gpus.iter().map(|g| (g.index, g.has_counter)).collect(),
            )
        });
        Ok(NvmlMeter {
            nvml,
            gpus,
            sampler,
            pid: std::process::id(),
            attribution,
        })
    }

    /// Whether mica, or the local server's process tree, holds a context on the GPU.
    fn uses_gpu(&self, index: u32) -> bool {
        let Ok(d) = self.nvml.device_by_index(index) else {
            return false;
        };
        let relevant = |pid: u32| {
            pid == self.pid
                || match &self.attribution {
                    GpuAttribution::Mica => false,
                    GpuAttribution::LocalServer {
                        pids, proc_root, ..
                    } => !pids.is_empty() && crate::local::in_trees(proc_root, pid, pids),
                }
        };
        let any = |r: Result<Vec<nvml_wrapper::struct_wrappers::device::ProcessInfo>, _>| {
            r.map(|ps| ps.iter().any(|p| relevant(p.pid)))
                .unwrap_or(false)
        };
        any(d.running_compute_processes()) || any(d.running_graphics_processes())
    }

    /// Which devices a window counts, in words.
    fn attribution_words(&self) -> String {
        match &self.attribution {
            GpuAttribution::Mica => "devices where mica holds a context (whole device)".into(),
            GpuAttribution::LocalServer { port, pids, .. } if pids.is_empty() => format!(
                "all {} visible devices (local server on port {port} not attributable)",
                self.gpus.len()
            ),
            GpuAttribution::LocalServer { port, pids, .. } => format!(
                "devices where local server pid {} (port {port}) or mica holds a context, else all {} visible (whole device)",
                pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
                self.gpus.len()
            ),
        }
    }
}

fn start_sampler(nvml: Arc<Nvml>, gpus: Vec<(u32, bool)>) -> Sampler {
    let stop = Arc::new(AtomicBool::new(false));
    let cumulative = Arc::new(Mutex::new(vec![0.0; gpus.len()]));
    let (stop2, cum2) = (stop.clone(), cumulative.clone());
    let handle = std::thread::Builder::new()
        .name("mica-nvml-power".into())
        .spawn(move || {
            let mut last = Instant::now();
            let read = |i: u32| {
                nvml.device_by_index(i)
                    .and_then(|d| d.power_usage())
                    .map(|mw| mw as f64)
                    .unwrap_or(0.0)
            };
            let mut last_mw: Vec<f64> = gpus.iter().map(|(i, _)| read(*i)).collect();
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(SAMPLE_PERIOD);
                let now = Instant::now();
                let dt = now.duration_since(last).as_secs_f64();
                last = now;
                let mut cum = cum2.lock().unwrap_or_else(|p| p.into_inner());
                for (k, (i, has_counter)) in gpus.iter().enumerate() {
                    if *has_counter {
                        continue;
                    }
                    let mw = read(*i);
                    // Trapezoid: mW x s = mJ.
                    cum[k] += (mw + last_mw[k]) / 2.0 * dt;
                    last_mw[k] = mw;
                }
            }
        })
        .expect("spawn NVML sampler thread");
    Sampler {
        stop,
        cumulative_mj: cumulative,
        handle: Some(handle),
    }
}

impl Drop for NvmlMeter {
    fn drop(&mut self) {
        if let Some(s) = &mut self.sampler {
            s.stop.store(true, Ordering::Relaxed);
            if let Some(h) = s.handle.take() {
                let _ = h.join();
            }
        }
    }
}

impl EnergyMeter for NvmlMeter {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn describe(&self) -> String {
        let gpus: Vec<String> = self
            .gpus
            .iter()
            .map(|g| {
                format!(
                    "gpu{} {} ({})",
                    g.index,
                    g.name,
                    if g.has_counter {
                        "total-energy counter"
                    } else {
                        "power sampled every 100 ms"
                    }
                )
            })
            .collect();
        format!(
            "NVML: {}; counts {}",
            gpus.join(", "),
            self.attribution_words()
        )
    }

    /// Values per GPU: cumulative mJ, then 1.0 if mica (or the local server) holds a context
    /// on it.
    fn read(&self) -> Result<Snapshot, EnergyError> {
        let sampled = self.sampler.as_ref().map(|s| {
            s.cumulative_mj
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        });
        let mut values = Vec::with_capacity(self.gpus.len() * 2);
        for (k, g) in self.gpus.iter().enumerate() {
            let mj = if g.has_counter {
                self.nvml
                    .device_by_index(g.index)
                    .and_then(|d| d.total_energy_consumption())
                    .map_err(|e| {
                        EnergyError::Read(format!("NVML gpu{} energy counter: {e}", g.index))
                    })? as f64
            } else {
                sampled.as_ref().map(|v| v[k]).unwrap_or(0.0)
            };
            values.push(mj);
            values.push(if self.uses_gpu(g.index) { 1.0 } else { 0.0 });
        }
        Ok(Snapshot::new(values))
    }

    fn delta(&self, start: &Snapshot, end: &Snapshot) -> Delta {
        let mut components = Vec::new();
        let mut notes = Vec::new();
        let used: Vec<bool> = (0..self.gpus.len())
            .map(|k| start.values[2 * k + 1] > 0.0 || end.values[2 * k + 1] > 0.0)
            .collect();
        let (counted, all_visible) = gpus_to_count(&used, &self.attribution);
        if all_visible {
            if let GpuAttribution::LocalServer { port, pids, .. } = &self.attribution {
                notes.push(format!(
                    "NVML: {} held a context on any of the {} visible GPU(s) at the window's start or end (a server in a container, or running on CPU), so every visible GPU is counted, whole device",
                    if pids.is_empty() {
                        format!("the local server on port {port} could not be attributed, and mica")
                    } else {
                        format!("neither the local server (pid {}) nor mica", pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))
                    },
                    self.gpus.len()
                ));
            }
        }
        for k in counted {
            let g = &self.gpus[k];
            let mj = (end.values[2 * k] - start.values[2 * k]).max(0.0);
            components.push(ComponentEnergy {
                component: Component::Gpu,
                label: format!("gpu{} {}", g.index, g.name),
                method: if g.has_counter {
                    Method::MeasuredNvml
                } else {
                    Method::SampledNvmlPower
                },
                joules: mj / 1000.0,
            });
        }
        if components.is_empty() && self.attribution == GpuAttribution::Mica {
            notes.push(format!(
                "NVML: this process (pid {}) held no context on any of {} visible GPU(s) at the window's start or end, so no GPU energy is counted (inside a container without --pid=host NVML cannot see the process)",
                self.pid,
                self.gpus.len()
            ));
        }
        Delta { components, notes }
    }

    fn details(&self) -> MeterDetails {
        let mut names: Vec<&str> = self.gpus.iter().map(|g| g.name.as_str()).collect();
        names.dedup();
        let mut warnings = Vec::new();
        if self.gpus.iter().any(|g| !g.has_counter) {
            warnings.push("some GPUs lack NVML's energy counter: their energy is integrated from power samples every 100 ms, which NVML itself updates only part of the time".into());
        }
        MeterDetails {
            cpu: None,
            gpu_model: Some(format!("{} x {}", self.gpus.len(), names.join(", "))),
            gpu_count: self.gpus.len(),
            tracking_mode: Some("machine"),
            scope: Some(self.attribution_words()),
            sampling_period_s: None,
            warnings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_a_driver_is_a_reason_not_a_panic() {
        match NvmlMeter::open() {
            Ok(m) => {
                // A machine with a GPU: the meter must read and produce a consistent window.
                let s = m.read().unwrap();
                let e = m.read().unwrap();
                let _ = m.delta(&s, &e);
                assert!(m.describe().starts_with("NVML"));
            }
            Err(reason) => assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn which_gpus_a_window_counts() {
        let server = GpuAttribution::LocalServer {
            port: 11434,
            pids: vec![300],
            proc_root: "/proc".into(),
        };
        assert_eq!(
            gpus_to_count(&[false, true], &GpuAttribution::Mica),
            (vec![1], false)
        );
        assert_eq!(
            gpus_to_count(&[false, false], &GpuAttribution::Mica),
            (vec![], false)
        );
        assert_eq!(
            gpus_to_count(&[false, true, true], &server),
            (vec![1, 2], false)
        );
        // The server seen on no GPU: every visible one, whole device.
        assert_eq!(gpus_to_count(&[false, false], &server), (vec![0, 1], true));
    }
}
