//! `mica energy ...`, and the energy flags and the measurement wrapper of `mica train`.
//!
//! Other commands flatten [`EnergyOpts`] into their flags and run their work inside
//! [`measured`]; everything about meters, carbon and output files stays here and in
//! `mica-energy`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mica_energy::{CarbonConfig, EnergyReport, MeterConfig, MeterSet};

use crate::exit::usage;

/// Energy and carbon flags, shared by every command that measures.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EnergyOpts {
    /// Country of the electricity grid, ISO 3166-1 alpha-3 (FRA, USA, DEU, IND, ...), for the
    /// carbon intensity. Without it (or --grid-intensity) the world average is used, loudly.
    #[arg(long, value_name = "ISO3")]
    pub country: Option<String>,
    /// Grid carbon intensity in gCO2e/kWh; overrides the country's table value.
    #[arg(long, value_name = "G")]
    pub grid_intensity: Option<f64>,
    /// Power usage effectiveness of the data centre (1.0 = energy at the machine only).
    #[arg(long, value_name = "P")]
    pub pue: Option<f64>,
    /// CPU TDP in watts for the CPU-time estimate, instead of the table value for the model.
    #[arg(long, value_name = "W")]
    pub tdp: Option<f64>,
    /// CPU model name for the TDP lookup, instead of /proc/cpuinfo's (useful in VMs that
    /// hide the SKU).
    #[arg(long, value_name = "NAME")]
    pub cpu_model: Option<String>,
    /// Electricity price in USD per kWh, for the report's break-even point between a trained
    /// CNN (training + inference energy) and a paid API; without it only energy is compared.
    #[arg(long, value_name = "USD_PER_KWH")]
    pub electricity_price: Option<f64>,
    /// Root of the powercap sysfs tree (for tests with a fake RAPL tree).
    #[arg(
        long,
        value_name = "DIR",
        hide = true,
        default_value = "/sys/class/powercap"
    )]
    pub powercap_root: PathBuf,
    /// Do not load NVML.
    #[arg(long, hide = true)]
    pub no_nvml: bool,
}

impl EnergyOpts {
    /// The carbon settings; a bad value is a usage error (exit 2).
    pub fn carbon(&self) -> anyhow::Result<CarbonConfig> {
        CarbonConfig::resolve(self.country.as_deref(), self.grid_intensity, self.pue)
            .map_err(|e| usage(e.to_string()))
    }

    pub fn meter_config(&self) -> anyhow::Result<MeterConfig> {
        if let Some(t) = self.tdp {
            if !t.is_finite() || t <= 0.0 || t > 10_000.0 {
                return Err(usage(format!(
                    "--tdp {t}: must be a power in watts, above 0"
                )));
            }
        }
        let root = if self.powercap_root.as_os_str().is_empty() {
            PathBuf::from("/sys/class/powercap")
        } else {
            self.powercap_root.clone()
        };
        Ok(MeterConfig {
            powercap_root: root,
            try_nvml: !self.no_nvml,
            tdp_w: self.tdp,
            cpu_model: self.cpu_model.clone(),
            ..MeterConfig::default()
        })
    }
}

/// Runs `f` inside an energy window, then appends a row to `run_dir/energy.csv`, writes
/// `run_dir/energy.json`, merges an `energy` section into `run_dir/metrics.json` if it exists,
/// and prints a one-line summary (method label, warnings) to stderr. `f` returns its value and
/// the number of images it processed.
pub fn measured<T>(
    opts: &EnergyOpts,
    run_dir: &Path,
    project_name: &str,
    f: impl FnOnce() -> anyhow::Result<(T, usize)>,
) -> anyhow::Result<T> {
    // Settings are checked before the work, so a typo fails in a second, not after an hour.
    let carbon = opts.carbon()?;
    let meters = MeterSet::auto(&opts.meter_config()?);
    let (value, report) = mica_energy::measure(&meters, &carbon, project_name, f)?;
    record(run_dir, &report)?;
    print_summary(&report);
    Ok(value)
}

/// Writes a finished report into a run directory (energy.csv row, energy.json, metrics.json's
/// `energy` section when metrics.json exists).
pub fn record(run_dir: &Path, report: &EnergyReport) -> anyhow::Result<()> {
    Ok(mica_run::record_energy(run_dir, report)?)
}

fn print_summary(report: &EnergyReport) {
    eprintln!("{}", report.summary_line());
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
}

#[derive(clap::Subcommand)]
pub enum EnergyCommand {
    /// Print what this machine can measure, and why not where it cannot.
    Probe(ProbeArgs),
    /// Spin the CPU for a while inside a window and print the report as JSON (for validating
    /// the estimate against CodeCarbon: bench/energy_vs_codecarbon.sh).
    #[command(hide = true)]
    Burn(BurnArgs),
}

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub energy: EnergyOpts,
    /// Print the probe as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct BurnArgs {
    /// Seconds of busy work.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Busy threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print `ready`, wait for a line on stdin before starting, and after printing the report
    /// wait for stdin to close before exiting: lets a parent's tracker see this process alive
    /// for the whole window.
    #[arg(long)]
    pub handshake: bool,
    /// Also record the window into this run directory (energy.csv, energy.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub energy: EnergyOpts,
}

pub fn run(cmd: EnergyCommand) -> anyhow::Result<()> {
    match cmd {
        EnergyCommand::Probe(a) => probe(a),
        EnergyCommand::Burn(a) => burn(a),
    }
}

fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let carbon = args.energy.carbon()?;
    let meters = MeterSet::auto(&args.energy.meter_config()?);
    // A zero-length window shows the method label; the median of a few more shows what one
    // window's reads cost once warm.
    let m = meters.start()?.stop()?;
    let mut costs: Vec<Duration> = (0..21)
        .map(|_| {
            let t = Instant::now();
            meters.start().and_then(|w| w.stop()).map(|_| t.elapsed())
        })
        .collect::<Result<_, _>>()?;
    costs.sort();
    let window_cost = costs[costs.len() / 2];
    let report = EnergyReport::new("probe", &m, &carbon, 0);
    if args.json {
        let v = serde_json::json!({
            "meters": meters.meters().iter().map(|m| serde_json::json!({
                "meter": m.name(), "reads": m.describe(),
            })).collect::<Vec<_>>(),
            "unavailable": meters.unavailable(),
            "method": report.method,
            "cpu": report.cpu,
            "gpu": report.gpu,
            "carbon": report.carbon,
            "window_read_cost_us": window_cost.as_secs_f64() * 1e6,
            "warnings": report.warnings,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    for u in meters.unavailable() {
        writeln!(out, "{}: unavailable: {}", u.meter.to_uppercase(), u.reason)?;
    }
    for meter in meters.meters() {
        writeln!(out, "{}: in use: {}", meter.name(), meter.describe())?;
    }
    if let Some(c) = &report.cpu {
        writeln!(
            out,
            "CPU: {} ({} threads); TDP {:.1} W: {}",
            c.model, c.threads, c.tdp_w, c.tdp_source_detail
        )?;
    }
    writeln!(out, "method: {}", report.method)?;
    writeln!(
        out,
        "carbon: {:.1} gCO2e/kWh ({}), PUE {:.2}",
        report.carbon.intensity_g_per_kwh, report.carbon.source_detail, report.carbon.pue
    )?;
    writeln!(
        out,
        "cost of one window (start + stop reads): {:.0} us",
        window_cost.as_secs_f64() * 1e6
    )?;
    for w in &report.warnings {
        writeln!(out, "warning: {w}")?;
    }
    Ok(())
}

fn burn(args: BurnArgs) -> anyhow::Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 3600.0) {
        return Err(usage(format!(
            "--seconds {}: must be in (0, 3600]",
            args.seconds
        )));
    }
    if args.threads == 0 || args.threads > 256 {
        return Err(usage(format!(
            "--threads {}: must be 1..=256",
            args.threads
        )));
    }
    let carbon = args.energy.carbon()?;
    let meters = MeterSet::auto(&args.energy.meter_config()?);
    let stdin = std::io::stdin();
    if args.handshake {
        println!("ready");
        std::io::stdout().flush()?;
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
    }
    let dur = Duration::from_secs_f64(args.seconds);
    let ((), report) = mica_energy::measure(&meters, &carbon, "burn", || {
        std::thread::scope(|s| {
            for _ in 0..args.threads {
                s.spawn(|| spin(dur));
            }
        });
        Ok::<_, mica_energy::EnergyError>(((), 0))
    })?;
    if let Some(dir) = &args.out {
        record(dir, &report)?;
    }
    println!("{}", serde_json::to_string(&report)?);
    std::io::stdout().flush()?;
    if args.handshake {
        // Stay alive (idle) until the parent has read its own tracker.
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stdin.lock(), &mut rest);
    }
    Ok(())
}

/// Integer busy work that the optimiser cannot remove.
fn spin(d: Duration) {
    let t = Instant::now();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while t.elapsed() < d {
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        std::hint::black_box(x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> EnergyOpts {
        EnergyOpts {
            grid_intensity: Some(100.0),
            tdp: Some(20.0),
            powercap_root: PathBuf::from("/nonexistent/powercap"),
            no_nvml: true,
            ..EnergyOpts::default()
        }
    }

    #[test]
    fn measured_writes_csv_json_and_merges_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        std::fs::write(run.join("metrics.json"), r#"{"accuracy": 0.9}"#).unwrap();
        let v = measured(&opts(), run, "test", || {
            spin(Duration::from_millis(30));
            Ok(("done", 3))
        })
        .unwrap();
        assert_eq!(v, "done");
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap())
                .unwrap();
        assert_eq!(metrics["accuracy"], 0.9);
        assert_eq!(metrics["energy"]["method"], "estimated:cpu-time*tdp");
        assert_eq!(metrics["energy"]["images"], 3);
        assert!(
            metrics["energy"]["per_image"]["energy_wh"]
                .as_f64()
                .unwrap()
                > 0.0
        );
        let csv = std::fs::read_to_string(run.join("energy.csv")).unwrap();
        assert_eq!(csv.lines().count(), 2);
    }

    #[test]
    fn bad_carbon_settings_fail_before_the_work() {
        let dir = tempfile::tempdir().unwrap();
        let o = EnergyOpts {
            country: Some("Narnia".into()),
            ..opts()
        };
        let mut ran = false;
        let err = measured(&o, dir.path(), "t", || {
            ran = true;
            Ok(((), 0))
        })
        .unwrap_err();
        assert!(!ran);
        assert!(err
            .chain()
            .any(|c| c.downcast_ref::<crate::UsageError>().is_some()));
    }
}
