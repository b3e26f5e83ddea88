//! The `energy` section of `metrics.json`: totals, per-image figures and their provenance.

use serde::{Deserialize, Serialize};

use crate::carbon::CarbonConfig;
use crate::meter::{Component, Measurement, Method, Unavailable};
use crate::remote::RemoteUsage;
use crate::tdp::TdpSource;
use crate::util::{experiment_uuid, host_info, online_cpus, run_id};
use mica_core::time::iso_utc;

const J_PER_WH: f64 = 3600.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentReport {
    pub component: Component,
    pub label: String,
    pub method: Method,
    pub energy_wh: f64,
    pub mean_power_w: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PerImage {
    pub energy_wh: f64,
    pub co2e_g: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuReport {
    pub model: String,
    pub tdp_w: f64,
    pub tdp_source: TdpSource,
    pub tdp_source_detail: String,
    pub threads: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuReport {
    pub model: String,
    pub count: usize,
}

/// A remote provider's share: never in `energy_wh`; the optional estimate stands apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteReport {
    pub method: Method,
    pub usage: RemoteUsage,
    /// From a published per-token figure, if one was attached; not a measurement.
    pub estimated_energy_wh: Option<f64>,
    pub estimate_source: Option<String>,
}

/// One measurement window, ready for `metrics.json` and `energy.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnergyReport {
    pub project_name: String,
    pub run_id: String,
    /// Start of the window, UTC.
    pub timestamp: String,
    /// e.g. `estimated:cpu-time*tdp`, `measured:rapl+measured:nvml`.
    pub method: String,
    pub duration_s: f64,
    pub images: usize,
    pub components: Vec<ComponentReport>,
    /// Energy at the machine (measured and estimated components; never remote APIs).
    pub energy_wh: f64,
    /// `energy_wh` x PUE: what the facility drew.
    pub facility_energy_wh: f64,
    pub co2e_g: f64,
    /// `energy_wh` and `co2e_g` divided by the images; absent when no image was processed.
    pub per_image: Option<PerImage>,
    pub per_1000_images: Option<PerImage>,
    pub cpu: Option<CpuReport>,
    pub gpu: Option<GpuReport>,
    /// `process` (CPU-time estimate) or `machine` (counters see every process).
    pub tracking_mode: String,
    pub carbon: CarbonConfig,
    #[serde(default)]
    pub remote: Vec<RemoteReport>,
    /// Meters not used on this machine, and why.
    #[serde(default)]
    pub unavailable: Vec<Unavailable>,
    /// Estimates, fallbacks and anything a reader must know before trusting the numbers.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Which processes the figure covers, so a reader can tell whether two rows compare:
    /// `mica process`, `mica + local server pid N (port P)`, `machine-wide`, then, where a
    /// GPU meter ran, `; GPU: <which devices>`. Empty in files written before the field.
    #[serde(default)]
    pub scope: String,
    /// Energy that was spent but is NOT in the totals, one entry per part, e.g.
    /// `local server on port 11434 (not-measured:local-server)` or a remote API. Non-empty
    /// means the totals are incomplete: no energy ratio should involve this row
    /// ([`EnergyReport::is_complete`]).
    #[serde(default)]
    pub not_measured: Vec<String>,
    /// CodeCarbon's `experiment_id`: UUID v5 of the project name by default
    /// ([`crate::experiment_uuid`]), or of the name given to
    /// [`EnergyReport::set_experiment`]. Empty in files written before the field.
    #[serde(default)]
    pub experiment_id: String,
    /// Logical CPUs online (CodeCarbon's `cpu_count`).
    #[serde(default)]
    pub cpu_count: Option<usize>,
    /// Total memory in GiB (CodeCarbon's `ram_total_size`).
    #[serde(default)]
    pub ram_total_gb: Option<f64>,
}

impl EnergyReport {
    pub fn new(
        project_name: &str,
        m: &Measurement,
        carbon: &CarbonConfig,
        images: usize,
    ) -> EnergyReport {
        let secs = m.duration.as_secs_f64();
        let components: Vec<ComponentReport> = m
            .components
            .iter()
            .map(|c| ComponentReport {
                component: c.component,
                label: c.label.clone(),
                method: c.method,
                energy_wh: c.joules / J_PER_WH,
                mean_power_w: if secs > 0.0 { c.joules / secs } else { 0.0 },
            })
            .collect();
        let joules = m.total_joules();
        let mut warnings = m.details.warnings.clone();
        warnings.extend(m.notes.iter().cloned());
        if let Some(w) = carbon.warning() {
            warnings.insert(0, w);
        }
        let not_measured = m.not_measured();
        let mut method = m.method_label();
        let mut uncounted: Vec<Method> = m
            .components
            .iter()
            .filter(|c| c.method.is_not_measured())
            .map(|c| c.method)
            .collect();
        uncounted.sort();
        uncounted.dedup();
        for u in uncounted {
            method = format!("{method}+{}", u.label());
        }
        let host = host_info();
        let mut r = EnergyReport {
            project_name: project_name.to_string(),
            run_id: run_id(),
            timestamp: iso_utc(m.started_at),
            method,
            duration_s: secs,
            images,
            components,
            energy_wh: joules / J_PER_WH,
            facility_energy_wh: joules / J_PER_WH * carbon.pue,
            co2e_g: carbon.co2e_g(joules),
            per_image: None,
            per_1000_images: None,
            cpu: m.details.cpu.as_ref().map(|c| CpuReport {
                model: c.model.clone(),
                tdp_w: c.tdp_w,
                tdp_source: c.tdp_source.clone(),
                tdp_source_detail: c.tdp_source.describe(),
                threads: c.threads,
            }),
            gpu: m.details.gpu_model.as_ref().map(|g| GpuReport {
                model: g.clone(),
                count: m.details.gpu_count,
            }),
            tracking_mode: m.details.tracking_mode.unwrap_or("process").to_string(),
            carbon: carbon.clone(),
            remote: Vec::new(),
            unavailable: m.unavailable.clone(),
            warnings,
            scope: m.scope(),
            not_measured,
            experiment_id: experiment_uuid(project_name),
            cpu_count: Some(online_cpus()),
            ram_total_gb: host.mem_total_gb,
        };
        r.set_images(images);
        r
    }

    /// Names the experiment this window belongs to: `experiment_id` becomes the UUID v5 of
    /// `name`, so every classifier of one comparison can share it.
    pub fn set_experiment(&mut self, name: &str) {
        self.experiment_id = experiment_uuid(name);
    }

    /// Whether the totals hold all the energy the work spent: false when a part (a local
    /// server, a remote API) is not measured, in which case no energy ratio should involve
    /// this report.
    pub fn is_complete(&self) -> bool {
        self.not_measured.is_empty() && self.remote.is_empty()
    }

    /// One report over several windows (a resumed run, the shards of a run): energies, CO2 and
    /// durations add up, methods that differ are all named, warnings are kept once, and
    /// `images` is the sum of the windows' images. `note` says what was summed, so the
    /// figure's provenance stays visible.
    pub fn sum(reports: &[EnergyReport], note: &str) -> Option<EnergyReport> {
        let (first, rest) = reports.split_first()?;
        let mut e = first.clone();
        let mut images = first.images;
        for r in rest {
            e.duration_s += r.duration_s;
            e.energy_wh += r.energy_wh;
            e.facility_energy_wh += r.facility_energy_wh;
            e.co2e_g += r.co2e_g;
            images += r.images;
            for c in &mut e.components {
                if let Some(o) = r
                    .components
                    .iter()
                    .find(|o| o.label == c.label && o.component == c.component)
                {
                    c.energy_wh += o.energy_wh;
                }
            }
            if r.method != e.method && !e.method.split('+').any(|m| m == r.method) {
                e.method = format!("{}+{}", e.method, r.method);
            }
            e.remote.extend(r.remote.iter().cloned());
            for n in &r.not_measured {
                if !e.not_measured.contains(n) {
                    e.not_measured.push(n.clone());
                }
            }
            if r.scope != e.scope && !r.scope.is_empty() {
                e.scope = if e.scope.is_empty() {
                    r.scope.clone()
                } else {
                    format!("mixed: {} | {}", e.scope, r.scope)
                };
            }
            for w in &r.warnings {
                if !e.warnings.contains(w) {
                    e.warnings.push(w.clone());
                }
            }
        }
        e.set_images(images);
        if !rest.is_empty() {
            e.warnings
                .push(format!("summed over {} {note}", reports.len()));
        }
        Some(e)
    }

    /// Sets the image count and recomputes the per-image figures.
    pub fn set_images(&mut self, images: usize) {
        self.images = images;
        let per = |n: f64| PerImage {
            energy_wh: self.energy_wh / n,
            co2e_g: self.co2e_g / n,
        };
        if images > 0 {
            let one = per(images as f64);
            self.per_image = Some(one);
            self.per_1000_images = Some(PerImage {
                energy_wh: one.energy_wh * 1000.0,
                co2e_g: one.co2e_g * 1000.0,
            });
        } else {
            self.per_image = None;
            self.per_1000_images = None;
        }
    }

    /// Records a remote API's share as `not-measured:remote-api`. Totals do not change; a
    /// published per-token figure, if attached, is stored beside them with its source.
    pub fn add_remote(&mut self, usage: RemoteUsage) {
        let estimated_energy_wh = usage
            .estimate
            .as_ref()
            .map(|e| usage.output_tokens as f64 / 1000.0 * e.wh_per_1000_output_tokens);
        let estimate_source = usage.estimate.as_ref().map(|e| e.source.clone());
        let warning = format!(
            "energy spent at the remote API ({} {}, {} requests, {} output tokens) is NOT MEASURED and not in the totals{}",
            usage.provider,
            usage.model,
            usage.requests,
            usage.output_tokens,
            match estimated_energy_wh {
                Some(wh) => format!("; a published per-token figure suggests about {wh:.3} Wh (see remote[].estimate_source)"),
                None => String::new(),
            }
        );
        self.warnings.push(warning);
        if !self.method.contains(Method::NotMeasuredRemoteApi.label()) {
            self.method = format!("{}+{}", self.method, Method::NotMeasuredRemoteApi.label());
        }
        let entry = format!(
            "remote API {} {} ({})",
            usage.provider,
            usage.model,
            Method::NotMeasuredRemoteApi.label()
        );
        if !self.not_measured.contains(&entry) {
            self.not_measured.push(entry);
        }
        self.remote.push(RemoteReport {
            method: Method::NotMeasuredRemoteApi,
            usage,
            estimated_energy_wh,
            estimate_source,
        });
    }

    /// Energy of one component kind in Wh.
    pub fn component_wh(&self, component: Component) -> f64 {
        self.components
            .iter()
            .filter(|c| c.component == component && c.method.counts_in_totals())
            .map(|c| c.energy_wh)
            .sum()
    }

    /// Whether any counted figure is an estimate.
    pub fn is_estimate(&self) -> bool {
        self.components.iter().any(|c| c.method.is_estimate())
    }

    /// One line for the terminal.
    pub fn summary_line(&self) -> String {
        let per = match self.per_image {
            Some(p) => format!(
                ", {:.4} Wh and {:.4} gCO2e per image ({} images)",
                p.energy_wh, p.co2e_g, self.images
            ),
            None => String::new(),
        };
        let tdp = match (&self.cpu, self.is_estimate()) {
            (Some(c), true) => format!(", TDP {:.1} W assumed", c.tdp_w),
            _ => String::new(),
        };
        let incomplete = if self.not_measured.is_empty() {
            String::new()
        } else {
            format!("; NOT MEASURED: {}", self.not_measured.join(", "))
        };
        format!(
            "energy [{}]: {:.4} Wh over {:.1} s, {:.4} gCO2e at {:.0} gCO2e/kWh x PUE {:.2}{per}{tdp}{incomplete}",
            self.method,
            self.energy_wh,
            self.duration_s,
            self.co2e_g,
            self.carbon.intensity_g_per_kwh,
            self.carbon.pue
        )
    }
}

/// Runs `work` inside one energy window of `meters` and reports it: the one way every command
/// measures (a run's classifier, `mica train`, `mica energy burn`). `work` returns its value
/// and the images it processed (for the per-image figures). A meter that fails to start or
/// stop is an error, never a silent fallback to another method.
pub fn measure<T, E: From<crate::EnergyError>>(
    meters: &crate::MeterSet,
    carbon: &crate::CarbonConfig,
    project: &str,
    work: impl FnOnce() -> Result<(T, usize), E>,
) -> Result<(T, EnergyReport), E> {
    let window = meters.start()?;
    let (value, images) = work()?;
    let m = window.stop()?;
    Ok((value, EnergyReport::new(project, &m, carbon, images)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::{ComponentEnergy, MeterDetails};
    use crate::remote::epoch_ai_gpt4o_2025;
    use std::time::{Duration, SystemTime};

    fn measurement() -> Measurement {
        Measurement {
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(86_400),
            duration: Duration::from_secs(10),
            components: vec![
                ComponentEnergy {
                    component: Component::Cpu,
                    label: "process".into(),
                    method: Method::EstimatedCpuTimeTdp,
                    joules: 2700.0,
                },
                ComponentEnergy {
                    component: Component::Ram,
                    label: "process".into(),
                    method: Method::EstimatedCpuTimeTdp,
                    joules: 900.0,
                },
            ],
            notes: vec![],
            details: MeterDetails::default(),
            unavailable: vec![],
        }
    }

    #[test]
    fn totals_and_per_image_figures() {
        let carbon = CarbonConfig::resolve(None, Some(500.0), Some(1.2)).unwrap();
        let r = EnergyReport::new("p", &measurement(), &carbon, 4);
        assert_eq!(r.timestamp, "1970-01-02T00:00:00Z");
        assert_eq!(r.energy_wh, 1.0);
        assert!((r.facility_energy_wh - 1.2).abs() < 1e-12);
        // 1 Wh = 0.001 kWh x 1.2 x 500 = 0.6 g.
        assert!((r.co2e_g - 0.6).abs() < 1e-12);
        let p = r.per_image.unwrap();
        assert_eq!(p.energy_wh, 0.25);
        assert!((r.per_1000_images.unwrap().co2e_g - 150.0).abs() < 1e-9);
        assert_eq!(r.components[0].mean_power_w, 270.0);
        assert_eq!(r.component_wh(Component::Ram), 0.25);
        assert_eq!(r.method, "estimated:cpu-time*tdp");
        assert!(r.summary_line().contains("[estimated:cpu-time*tdp]"));
        let zero = EnergyReport::new("p", &measurement(), &carbon, 0);
        assert!(zero.per_image.is_none());
    }

    #[test]
    fn world_average_warning_leads_the_report() {
        let carbon = CarbonConfig::resolve(None, None, None).unwrap();
        let r = EnergyReport::new("p", &measurement(), &carbon, 1);
        assert!(r.warnings[0].contains("WORLD AVERAGE"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["carbon"]["source"], "world-average-fallback");
        let back: EnergyReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn remote_usage_never_enters_totals() {
        let carbon = CarbonConfig::resolve(Some("FRA"), None, None).unwrap();
        let mut r = EnergyReport::new("p", &measurement(), &carbon, 2);
        let before = (r.energy_wh, r.co2e_g);
        r.add_remote(RemoteUsage {
            provider: "openai".into(),
            model: "gpt-4o".into(),
            requests: 2,
            input_tokens: 2000,
            output_tokens: 1000,
            estimate: Some(epoch_ai_gpt4o_2025()),
        });
        assert_eq!((r.energy_wh, r.co2e_g), before);
        assert_eq!(r.remote[0].estimated_energy_wh, Some(0.6));
        assert!(r.remote[0]
            .estimate_source
            .as_ref()
            .unwrap()
            .contains("Epoch AI"));
        assert!(r.method.ends_with("+not-measured:remote-api"));
        assert!(r.warnings.iter().any(|w| w.contains("NOT MEASURED")));
        assert!(!r.is_complete());
        assert_eq!(
            r.not_measured,
            ["remote API openai gpt-4o (not-measured:remote-api)"]
        );
    }

    #[test]
    fn a_local_server_not_measured_is_flagged_and_left_out_of_totals() {
        let mut m = measurement();
        m.components.push(ComponentEnergy {
            component: Component::Cpu,
            label: "local server on port 11434".into(),
            method: Method::NotMeasuredLocalServer,
            joules: 0.0,
        });
        m.details.scope = Some("mica process (local server on port 11434 NOT measured)".into());
        let carbon = CarbonConfig::resolve(None, Some(500.0), Some(1.0)).unwrap();
        let r = EnergyReport::new("p", &m, &carbon, 4);
        assert_eq!(r.energy_wh, 1.0, "the process's 3600 J only");
        assert_eq!(r.component_wh(Component::Cpu), 0.75);
        assert_eq!(r.method, "estimated:cpu-time*tdp+not-measured:local-server");
        assert_eq!(
            r.not_measured,
            ["local server on port 11434 (not-measured:local-server)"]
        );
        assert!(!r.is_complete());
        assert!(r.scope.contains("NOT measured"));
        assert!(r
            .summary_line()
            .contains("NOT MEASURED: local server on port 11434"));
        // Survives the round trip; an old file without the new fields reads as before.
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            serde_json::from_value::<EnergyReport>(json.clone()).unwrap(),
            r
        );
        let mut old = json;
        for k in [
            "scope",
            "not_measured",
            "experiment_id",
            "cpu_count",
            "ram_total_gb",
        ] {
            old.as_object_mut().unwrap().remove(k);
        }
        let back: EnergyReport = serde_json::from_value(old).unwrap();
        assert!(back.not_measured.is_empty() && back.scope.is_empty());
        assert!(back.is_complete());
        // Summing keeps the flag.
        let complete = EnergyReport::new("p", &measurement(), &carbon, 1);
        assert!(complete.is_complete());
        assert_eq!(complete.scope, "mica process");
        let sum = EnergyReport::sum(&[complete, r], "shards").unwrap();
        assert!(!sum.is_complete());
        assert!(
            sum.scope.starts_with("mixed: mica process | "),
            "{}",
            sum.scope
        );
    }

    #[test]
    fn experiment_id_is_a_stable_uuid_v5() {
        let carbon = CarbonConfig::resolve(None, Some(500.0), None).unwrap();
        let a = EnergyReport::new("brain-mri", &measurement(), &carbon, 1);
        let b = EnergyReport::new("brain-mri", &measurement(), &carbon, 1);
        assert_ne!(a.run_id, b.run_id);
        assert_eq!(a.experiment_id, b.experiment_id);
        assert_eq!(&a.experiment_id[14..15], "5");
        let mut c = a.clone();
        c.set_experiment("runs/exp1");
        assert_ne!(c.experiment_id, a.experiment_id);
        assert!(a.cpu_count.unwrap() >= 1);
    }
}
