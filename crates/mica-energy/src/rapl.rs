//! RAPL energy counters through the powercap sysfs tree (Intel, and AMD Zen since Linux 5.8,
//! which uses the same `intel-rapl` zones).
//!
//! Counting rules, each one a bug seen in CodeCarbon's tracker:
//! - package zones (plus their DRAM sub-zones) are the CPU figure; `psys` covers the package
//!   and more, so it is used only when no package zone exists, never summed with one;
//! - `core`/`uncore` sub-zones are parts of the package and never added;
//! - an `intel-rapl-mmio` zone with the same name as an MSR zone is the same counter read
//!   another way, and two zones with the same name (mirrored dies) are one counter;
//! - two package counters that move in lock-step (identical readings at both ends of a window)
//!   are one mirrored counter;
//! - counters wrap at `max_energy_range_uj`, which a 100 W package reaches in about 44 min, so
//!   a background thread reads every zone often enough that no counter can wrap twice between
//!   two reads (see [`sampling_period`]) and accumulates a monotonic total per zone; windows
//!   subtract those totals, so a window of any length is exact;
//! - an unreadable `energy_uj` (root-only since the 2020 PLATYPUS mitigation) makes the meter
//!   unavailable with that reason, instead of a silent zero.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::meter::{
    Component, ComponentEnergy, Delta, EnergyMeter, MeterDetails, Method, Snapshot,
};
use crate::EnergyError;

/// Reads a sysfs file; injectable so tests can simulate permission errors even as root.
pub type SysfsReader = Arc<dyn Fn(&Path) -> io::Result<String> + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Package,
    Psys,
    Dram,
    Sub,
    Other,
}

#[derive(Debug, Clone)]
struct Zone {
    /// Directory name, e.g. `intel-rapl:0:1`.
    id: String,
    name: String,
    kind: Kind,
    mmio: bool,
    energy_path: PathBuf,
    max_range_uj: Option<u64>,
    /// The top-level zone this one sits under (for DRAM sub-zones).
    parent: Option<String>,
}

/// A power no RAPL zone of one package (or its DRAM) can exceed: a generous bound, so the
/// sampling period leaves room for the largest server CPUs (about 400 W TDP, with turbo spikes).
pub const MAX_PACKAGE_W: f64 = 500.0;
/// The same bound for `psys`, which covers the whole platform.
pub const MAX_PLATFORM_W: f64 = 1500.0;
/// Longest sampling period: wrap safety needs far less often on real ranges (262 kJ at 500 W
/// wraps in 8.7 min), but a short period keeps a late sample (a starved thread) harmless.
pub const MAX_PERIOD: Duration = Duration::from_secs(10);
/// Shortest period, for tiny (or fake) ranges: each sample costs a few sysfs reads.
pub const MIN_PERIOD: Duration = Duration::from_millis(100);

/// Accumulated state of one zone.
#[derive(Debug, Clone, Default)]
struct ZoneTotal {
    last_raw: u64,
    /// Starts at the first raw reading (so two mirrored zones keep identical totals) and only
    /// grows.
    total_uj: u128,
    wraps: u64,
    /// Backward steps of a counter whose range is unknown: counted as 0.
    uncorrected: u64,
    /// Samples further apart than the counter takes to wrap at the power bound.
    late: u64,
}

struct Totals {
    zones: Vec<ZoneTotal>,
    last_at: Instant,
}

/// What the sampling thread shares with the meter.
struct Shared {
    zones: Vec<(Zone, Component, String)>,
    reader: SysfsReader,
    /// Seconds each zone needs to wrap at its power bound (None: range unknown).
    wrap_s: Vec<Option<f64>>,
    totals: Mutex<Totals>,
}

struct SamplerThread {
    stop: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// A RAPL reader over a fixed set of de-duplicated zones, with a background thread that keeps
/// monotonic per-zone totals (see the module documentation).
pub struct RaplMeter {
    shared: Arc<Shared>,
    notes: Vec<String>,
    period: Duration,
    sampler: Option<SamplerThread>,
}

fn power_bound_w(kind: Kind) -> f64 {
    if kind == Kind::Psys {
        MAX_PLATFORM_W
    } else {
        MAX_PACKAGE_W
    }
}

/// The period that keeps every counter from wrapping twice between reads: half the time the
/// fastest-wrapping zone needs to run through its range at the power bound, clamped to
/// [`MIN_PERIOD`, `MAX_PERIOD`]. A zone without a known range does not shorten it.
pub fn sampling_period(ranges: &[(Option<u64>, f64)]) -> Duration {
    let fastest = ranges
        .iter()
        .filter_map(|(max, w)| max.map(|m| m as f64 / 1e6 / w))
        .fold(f64::INFINITY, f64::min);
    if !fastest.is_finite() {
        return MAX_PERIOD;
    }
    Duration::from_secs_f64(
        (fastest / 2.0).clamp(MIN_PERIOD.as_secs_f64(), MAX_PERIOD.as_secs_f64()),
    )
}

fn read_counter(reader: &SysfsReader, z: &Zone) -> Result<u64, EnergyError> {
    let s = reader(&z.energy_path).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            EnergyError::Read(permission_hint(&z.energy_path))
        } else {
            EnergyError::Read(format!("{}: {e}", z.energy_path.display()))
        }
    })?;
    parse_u64(&s).ok_or_else(|| EnergyError::Format {
        path: z.energy_path.clone(),
        message: format!("not a counter value: {:?}", s.trim()),
    })
}

impl Shared {
    /// Reads every zone and folds the readings into the totals. The lock is held across the
    /// reads, so two concurrent samples cannot interleave and make a counter look as if it went
    /// backwards. A failed read leaves the totals untouched.
    fn sample(&self) -> Result<Vec<ZoneTotal>, EnergyError> {
        let mut t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let raws = self
            .zones
            .iter()
            .map(|(z, _, _)| read_counter(&self.reader, z))
            .collect::<Result<Vec<_>, _>>()?;
        let now = Instant::now();
        let gap = now.duration_since(t.last_at).as_secs_f64();
        t.last_at = now;
        for (i, raw) in raws.into_iter().enumerate() {
            let max = self.zones[i].0.max_range_uj;
            let zt = &mut t.zones[i];
            let step = match wrapped_delta_uj(zt.last_raw, raw, max) {
                Some(d) => {
                    if raw < zt.last_raw {
                        zt.wraps += 1;
                    }
                    d
                }
                None => {
                    zt.uncorrected += 1;
                    0
                }
            };
            if self.wrap_s[i].is_some_and(|w| gap > w) {
                zt.late += 1;
            }
            zt.total_uj += u128::from(step);
            zt.last_raw = raw;
        }
        Ok(t.zones.clone())
    }
}

fn start_sampler(shared: Arc<Shared>, period: Duration) -> SamplerThread {
    let (tx, rx) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("mica-rapl-sampler".into())
        .spawn(move || {
            // Ends when the meter is dropped (sender gone) or asked to stop.
            while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(period) {
                // Errors surface at the window's own read; the next tick tries again.
                let _ = shared.sample();
            }
        })
        .expect("spawn RAPL sampler thread");
    SamplerThread {
        stop: Some(tx),
        handle: Some(handle),
    }
}

impl Drop for RaplMeter {
    fn drop(&mut self) {
        if let Some(s) = &mut self.sampler {
            drop(s.stop.take());
            if let Some(h) = s.handle.take() {
                let _ = h.join();
            }
        }
    }
}

fn default_reader() -> SysfsReader {
    Arc::new(|p: &Path| std::fs::read_to_string(p))
}

fn parent_id(id: &str) -> Option<String> {
    // intel-rapl:0:1 -> intel-rapl:0
    let (prefix, rest) = id.split_once(':')?;
    let parts: Vec<&str> = rest.split(':').collect();
    (parts.len() > 1).then(|| format!("{prefix}:{}", parts[..parts.len() - 1].join(":")))
}

/// Collects zone directories (names like `intel-rapl:0`, `intel-rapl-mmio:0`, `intel-rapl:0:1`)
/// in both the flat `/sys/class/powercap` layout and the nested device layout.
fn find_zone_dirs(root: &Path, depth: usize, out: &mut BTreeMap<String, PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.contains("rapl") {
            continue;
        }
        let path = e.path();
        if name.contains(':') {
            out.entry(name).or_insert_with(|| path.clone());
        }
        if depth > 0 && path.is_dir() {
            find_zone_dirs(&path, depth - 1, out);
        }
    }
}

fn permission_hint(path: &Path) -> String {
    format!(
        "{}: permission denied (energy_uj has been root-only since the 2020 PLATYPUS mitigation; run as root or grant read access, e.g. `sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj`)",
        path.display()
    )
}

fn parse_u64(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

impl RaplMeter {
    /// Opens the powercap tree at `root` (normally `/sys/class/powercap`). The error is the
    /// reason RAPL cannot be used, in words, for `mica energy probe` and the report.
    pub fn open(root: &Path) -> Result<RaplMeter, String> {
        Self::open_with_reader(root, default_reader())
    }

    /// [`RaplMeter::open`] with an injected file reader; starts the background sampler.
    pub fn open_with_reader(root: &Path, reader: SysfsReader) -> Result<RaplMeter, String> {
        let mut m = Self::open_manual(root, reader)?;
        m.sampler = Some(start_sampler(m.shared.clone(), m.period));
        Ok(m)
    }

    /// Opens without the background thread: the counters are folded in only by
    /// [`RaplMeter::sample_now`] and [`EnergyMeter::read`]. For tests (which drive the
    /// sampling by hand, deterministically) and callers that sample on their own schedule at
    /// least every [`RaplMeter::sampling_period`].
    pub fn open_manual(root: &Path, reader: SysfsReader) -> Result<RaplMeter, String> {
        if !root.exists() {
            return Err(format!(
                "{} absent (no RAPL exposed, typical of VMs and containers)",
                root.display()
            ));
        }
        let mut dirs = BTreeMap::new();
        find_zone_dirs(root, 2, &mut dirs);
        if dirs.is_empty() {
            return Err(format!("{}: no intel-rapl zones", root.display()));
        }
        let mut notes = Vec::new();
        let mut zones = Vec::new();
        for (id, dir) in &dirs {
            let name = match reader(&dir.join("name")) {
                Ok(n) => n.trim().to_string(),
                Err(e) => {
                    notes.push(format!(
                        "{}: unreadable name ({e}); zone skipped",
                        dir.display()
                    ));
                    continue;
                }
            };
            let lower = name.to_lowercase();
            let kind = if lower.starts_with("package") {
                Kind::Package
            } else if lower == "psys" {
                Kind::Psys
            } else if lower == "dram" {
                Kind::Dram
            } else if lower == "core" || lower == "uncore" {
                Kind::Sub
            } else {
                Kind::Other
            };
            let max_range_uj = reader(&dir.join("max_energy_range_uj"))
                .ok()
                .and_then(|s| parse_u64(&s));
            zones.push(Zone {
                id: id.clone(),
                name,
                kind,
                mmio: id.starts_with("intel-rapl-mmio"),
                energy_path: dir.join("energy_uj"),
                max_range_uj,
                parent: parent_id(id),
            });
        }

        // Duplicates: an MMIO zone that mirrors an MSR zone of the same name, and repeated
        // names (mirrored dies). Keep the first MSR zone of each (kind, parent name, name).
        let name_of = |id: &Option<String>| -> String {
            id.as_ref()
                .and_then(|p| zones.iter().find(|z| &z.id == p))
                .map(|z| z.name.clone())
                .unwrap_or_default()
        };
        let mut ordered: Vec<&Zone> = zones.iter().collect();
        ordered.sort_by_key(|z| (z.mmio, z.id.clone()));
        let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
        let mut dropped: BTreeSet<String> = BTreeSet::new();
        for z in &ordered {
            if matches!(z.kind, Kind::Sub | Kind::Other) {
                continue;
            }
            let parent_name = if z.kind == Kind::Dram {
                name_of(&z.parent)
            } else {
                String::new()
            };
            let key = (parent_name, z.name.to_lowercase());
            if let Some(first) = seen.get(&key) {
                notes.push(format!(
                    "RAPL zone {} ({}) duplicates {first}; counted once",
                    z.id, z.name
                ));
                dropped.insert(z.id.clone());
            } else if z.parent.as_ref().is_some_and(|p| dropped.contains(p)) {
                dropped.insert(z.id.clone());
            } else {
                seen.insert(key, z.id.clone());
            }
        }
        let kept: Vec<&Zone> = ordered
            .into_iter()
            .filter(|z| !dropped.contains(&z.id))
            .collect();
        let packages: Vec<&Zone> = kept
            .iter()
            .copied()
            .filter(|z| z.kind == Kind::Package)
            .collect();
        let psys: Vec<&Zone> = kept
            .iter()
            .copied()
            .filter(|z| z.kind == Kind::Psys)
            .collect();
        let drams: Vec<&Zone> = kept
            .iter()
            .copied()
            .filter(|z| z.kind == Kind::Dram)
            .collect();

        let mut chosen: Vec<(Zone, Component, String)> = Vec::new();
        if !packages.is_empty() {
            for p in &packages {
                chosen.push(((*p).clone(), Component::Cpu, p.name.clone()));
            }
            for d in &drams {
                let owner = name_of(&d.parent);
                let label = if owner.is_empty() {
                    "dram".to_string()
                } else {
                    format!("dram ({owner})")
                };
                chosen.push(((*d).clone(), Component::Ram, label));
            }
            if !psys.is_empty() {
                notes.push("RAPL psys (platform) zone not used: it includes the package zones, so adding it would count them twice".into());
            }
        } else if let Some(p) = psys.first() {
            chosen.push(((*p).clone(), Component::Cpu, "psys (platform)".into()));
            notes.push("RAPL has no package zone; using psys, which covers the whole platform (CPU, chipset, DRAM on some systems), so no DRAM zone is added".into());
        } else {
            return Err(format!(
                "{}: no package or psys zone among {} RAPL zones",
                root.display(),
                dirs.len()
            ));
        }

        // Readability, now rather than at the first window; the first readings seed the totals.
        let mut first = Vec::with_capacity(chosen.len());
        for (z, _, _) in &chosen {
            match reader(&z.energy_path) {
                Ok(s) if parse_u64(&s).is_some() => first.push(parse_u64(&s).unwrap_or(0)),
                Ok(s) => {
                    return Err(format!(
                        "{}: not a counter value: {:?}",
                        z.energy_path.display(),
                        s.trim()
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(permission_hint(&z.energy_path))
                }
                Err(e) => return Err(format!("{}: {e}", z.energy_path.display())),
            }
            if z.max_range_uj.is_none() {
                notes.push(format!(
                    "{}: max_energy_range_uj unreadable; a counter wrap in a window cannot be corrected",
                    z.id
                ));
            }
        }
        let bounds: Vec<(Option<u64>, f64)> = chosen
            .iter()
            .map(|(z, _, _)| (z.max_range_uj, power_bound_w(z.kind)))
            .collect();
        let period = sampling_period(&bounds);
        let wrap_s = bounds
            .iter()
            .map(|(max, w)| max.map(|m| m as f64 / 1e6 / w))
            .collect();
        let totals = Totals {
            zones: first
                .iter()
                .map(|&raw| ZoneTotal {
                    last_raw: raw,
                    total_uj: u128::from(raw),
                    ..ZoneTotal::default()
                })
                .collect(),
            last_at: Instant::now(),
        };
        Ok(RaplMeter {
            shared: Arc::new(Shared {
                zones: chosen,
                reader,
                wrap_s,
                totals: Mutex::new(totals),
            }),
            notes,
            period,
            sampler: None,
        })
    }

    /// Reads every counter now and folds the readings into the running totals: one step of
    /// what the background thread does every [`RaplMeter::sampling_period`].
    pub fn sample_now(&self) -> Result<(), EnergyError> {
        self.shared.sample().map(|_| ())
    }

    /// How often the background thread reads the counters.
    pub fn sampling_period(&self) -> Duration {
        self.period
    }

    /// Whether a background thread samples the counters (false after [`RaplMeter::open_manual`]).
    pub fn is_sampling(&self) -> bool {
        self.sampler.is_some()
    }

    pub fn has_dram(&self) -> bool {
        self.shared
            .zones
            .iter()
            .any(|(_, c, _)| *c == Component::Ram)
    }

    /// Notes from discovery (duplicates dropped, psys skipped).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Labels of the zones that are counted.
    pub fn zone_labels(&self) -> Vec<String> {
        self.shared
            .zones
            .iter()
            .map(|(_, _, l)| l.clone())
            .collect()
    }
}

/// Microjoules between two readings of a counter that wraps at `max` (None: unknown range).
pub fn wrapped_delta_uj(start: u64, end: u64, max: Option<u64>) -> Option<u64> {
    if end >= start {
        Some(end - start)
    } else {
        max.filter(|&m| m >= start).map(|m| m - start + end)
    }
}

/// Values per zone in a [`Snapshot`]: total µJ, wraps, uncorrected backward steps, late samples.
const PER_ZONE: usize = 4;

impl EnergyMeter for RaplMeter {
    fn name(&self) -> &'static str {
        "rapl"
    }

    fn describe(&self) -> String {
        let zones: Vec<String> = self
            .shared
            .zones
            .iter()
            .map(|(z, _, l)| format!("{l} [{}]", z.id))
            .collect();
        format!(
            "RAPL energy counters (machine-wide), {}: {}",
            if self.sampler.is_some() {
                format!(
                    "sampled every {:.1} s in the background",
                    self.period.as_secs_f64()
                )
            } else {
                "sampled by hand".to_string()
            },
            zones.join(", ")
        )
    }

    /// Takes a fresh sample, then returns the accumulated totals (monotonic, wrap-corrected).
    fn read(&self) -> Result<Snapshot, EnergyError> {
        let totals = self.shared.sample()?;
        let mut values = Vec::with_capacity(totals.len() * PER_ZONE);
        for t in totals {
            values.extend([
                t.total_uj as f64,
                t.wraps as f64,
                t.uncorrected as f64,
                t.late as f64,
            ]);
        }
        Ok(Snapshot::new(values))
    }

    fn delta(&self, start: &Snapshot, end: &Snapshot) -> Delta {
        let mut notes = Vec::new();
        let mut components: Vec<ComponentEnergy> = Vec::new();
        let mut package_readings: Vec<(f64, f64, String)> = Vec::new();
        let period = self.period.as_secs_f64();
        for (i, (_, component, label)) in self.shared.zones.iter().enumerate() {
            let at = |snap: &Snapshot, k: usize| snap.values[i * PER_ZONE + k];
            let (s, e) = (at(start, 0), at(end, 0));
            if *component == Component::Cpu {
                if let Some((_, _, first)) = package_readings
                    .iter()
                    .find(|(ps, pe, _)| *ps == s && *pe == e && e != s)
                {
                    notes.push(format!(
                        "RAPL {label} read exactly like {first} at both ends of the window: a mirrored counter, counted once"
                    ));
                    continue;
                }
                package_readings.push((s, e, label.clone()));
            }
            let count = |k: usize| (at(end, k) - at(start, k)).max(0.0) as u64;
            let (wraps, uncorrected, late) = (count(1), count(2), count(3));
            if wraps > 0 {
                notes.push(format!(
                    "RAPL {label}: counter wrapped {wraps} time(s) during the window (each corrected with max_energy_range_uj; counters sampled every {period:.1} s)"
                ));
            }
            if uncorrected > 0 {
                notes.push(format!(
                    "RAPL {label}: counter went backwards {uncorrected} time(s) and its range is unknown; those intervals counted as 0"
                ));
            }
            if late > 0 {
                notes.push(format!(
                    "RAPL {label}: {late} sample(s) came later than the counter needs to wrap at {MAX_PACKAGE_W:.0} W (suspend or a starved sampler); a wrap may have been missed"
                ));
            }
            components.push(ComponentEnergy {
                component: *component,
                label: label.clone(),
                method: Method::MeasuredRapl,
                joules: (e - s).max(0.0) / 1e6,
            });
        }
        Delta { components, notes }
    }

    fn details(&self) -> MeterDetails {
        let mut warnings = self.notes.clone();
        warnings.push(
            "RAPL counts the whole package, including other processes running at the same time"
                .into(),
        );
        MeterDetails {
            tracking_mode: Some("machine"),
            scope: Some(crate::meter::SCOPE_MACHINE.into()),
            sampling_period_s: self.sampler.as_ref().map(|_| self.period.as_secs_f64()),
            warnings,
            ..MeterDetails::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Writes a zone under a flat fake `/sys/class/powercap`.
    fn zone(root: &Path, id: &str, name: &str, energy: u64, max: u64) {
        let d = root.join(id);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("name"), format!("{name}\n")).unwrap();
        fs::write(d.join("energy_uj"), format!("{energy}\n")).unwrap();
        fs::write(d.join("max_energy_range_uj"), format!("{max}\n")).unwrap();
    }

    fn set_energy(root: &Path, id: &str, energy: u64) {
        fs::write(root.join(id).join("energy_uj"), format!("{energy}\n")).unwrap();
    }

    fn window(m: &RaplMeter, root: &Path, ends: &[(&str, u64)]) -> Delta {
        let s = m.read().unwrap();
        for (id, e) in ends {
            set_energy(root, id, *e);
        }
        let e = m.read().unwrap();
        m.delta(&s, &e)
    }

    const MAX: u64 = 262_143_328_850;

    /// Without the background thread: the tests write the fake files, and a sampler reading a
    /// half-written file would be a race of the test's making.
    fn open(root: &Path) -> RaplMeter {
        RaplMeter::open_manual(root, default_reader()).unwrap()
    }

    #[test]
    fn package_and_dram_without_double_counting() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        zone(r, "intel-rapl:0", "package-0", 1_000_000, MAX);
        zone(r, "intel-rapl:0:0", "core", 500_000, MAX);
        zone(r, "intel-rapl:0:1", "uncore", 100_000, MAX);
        zone(r, "intel-rapl:0:2", "dram", 2_000_000, MAX);
        zone(r, "intel-rapl:1", "psys", 9_000_000, MAX);
        let m = open(r);
        assert!(m.has_dram());
        assert_eq!(m.zone_labels(), ["package-0", "dram (package-0)"]);
        assert!(m.notes().iter().any(|n| n.contains("psys")));
        let d = window(
            &m,
            r,
            &[
                ("intel-rapl:0", 11_000_000),
                ("intel-rapl:0:0", 9_000_000),
                ("intel-rapl:0:2", 5_000_000),
                ("intel-rapl:1", 40_000_000),
            ],
        );
        let total: f64 = d.components.iter().map(|c| c.joules).sum();
        assert_eq!(
            total, 13.0,
            "package 10 J + dram 3 J; core, uncore and psys not added"
        );
        assert!(d
            .components
            .iter()
            .all(|c| c.method == Method::MeasuredRapl));
    }

    #[test]
    fn psys_only_when_there_is_no_package() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        zone(r, "intel-rapl:1", "psys", 0, MAX);
        zone(r, "intel-rapl:1:0", "dram", 0, MAX);
        let m = open(r);
        assert_eq!(m.zone_labels(), ["psys (platform)"]);
        assert!(!m.has_dram());
    }

    #[test]
    fn counter_wrap_uses_max_energy_range() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        zone(r, "intel-rapl:0", "package-0", MAX - 1_000_000, MAX);
        let m = open(r);
        let d = window(&m, r, &[("intel-rapl:0", 2_000_000)]);
        assert_eq!(d.components[0].joules, 3.0);
        assert!(d.notes.iter().any(|n| n.contains("wrapped")));
        assert_eq!(wrapped_delta_uj(10, 5, None), None);
        assert_eq!(wrapped_delta_uj(5, 10, None), Some(5));
    }

    #[test]
    fn mmio_copies_and_repeated_names_are_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        zone(r, "intel-rapl:0", "package-0", 0, MAX);
        zone(r, "intel-rapl-mmio:0", "package-0", 0, MAX);
        zone(r, "intel-rapl:1", "package-1", 0, MAX);
        zone(r, "intel-rapl:2", "package-1", 0, MAX);
        zone(r, "intel-rapl:2:0", "dram", 0, MAX);
        let m = open(r);
        assert_eq!(m.zone_labels(), ["package-0", "package-1"]);
        assert_eq!(
            m.notes()
                .iter()
                .filter(|n| n.contains("duplicates"))
                .count(),
            2
        );
        let d = window(
            &m,
            r,
            &[
                ("intel-rapl:0", 4_000_000),
                ("intel-rapl-mmio:0", 4_000_000),
                ("intel-rapl:1", 1_000_000),
                ("intel-rapl:2", 1_000_000),
            ],
        );
        let total: f64 = d.components.iter().map(|c| c.joules).sum();
        assert_eq!(total, 5.0);
    }

    #[test]
    fn lock_step_packages_are_mirrors() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        zone(r, "intel-rapl:0", "package-0", 7_000, MAX);
        zone(r, "intel-rapl:1", "package-1", 7_000, MAX);
        let m = open(r);
        let d = window(
            &m,
            r,
            &[("intel-rapl:0", 3_007_000), ("intel-rapl:1", 3_007_000)],
        );
        assert_eq!(d.components.len(), 1);
        assert_eq!(d.components[0].joules, 3.0);
        assert!(d.notes.iter().any(|n| n.contains("mirrored")));
    }

    #[test]
    fn nested_device_layout_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("intel-rapl");
        zone(&r, "intel-rapl:0", "package-0", 0, MAX);
        zone(&r.join("intel-rapl:0"), "intel-rapl:0:0", "dram", 0, MAX);
        let m = open(dir.path());
        assert_eq!(m.zone_labels(), ["package-0", "dram (package-0)"]);
    }

    #[test]
    fn permission_denied_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().to_path_buf();
        zone(&r, "intel-rapl:0", "package-0", 0, MAX);
        let reader: SysfsReader = Arc::new(|p: &Path| {
            if p.ends_with("energy_uj") {
                Err(io::Error::from(io::ErrorKind::PermissionDenied))
            } else {
                fs::read_to_string(p)
            }
        });
        let err = RaplMeter::open_with_reader(&r, reader).err().unwrap();
        assert!(err.contains("permission denied"), "{err}");
        assert!(err.contains("intel-rapl:0/energy_uj"), "{err}");

        // The real thing, where the test does not run as root (root reads mode-000 files).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            use std::os::unix::fs::PermissionsExt;
            let f = r.join("intel-rapl:0/energy_uj");
            fs::set_permissions(&f, fs::Permissions::from_mode(0o000)).unwrap();
            let err = RaplMeter::open(&r).err().unwrap();
            assert!(err.contains("permission denied"), "{err}");
        }
    }

    #[test]
    fn absent_or_empty_trees_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = RaplMeter::open(&dir.path().join("powercap")).err().unwrap();
        assert!(err.contains("absent"), "{err}");
        let err = RaplMeter::open(dir.path()).err().unwrap();
        assert!(err.contains("no intel-rapl zones"), "{err}");
        zone(dir.path(), "intel-rapl:0:0", "core", 0, MAX);
        let err = RaplMeter::open(dir.path()).err().unwrap();
        assert!(err.contains("no package or psys"), "{err}");
    }

    /// A counter kept in memory (reads are atomic), wrapping at `max` like the hardware.
    struct FakeCounter {
        value: Arc<std::sync::atomic::AtomicU64>,
        max: u64,
    }

    impl FakeCounter {
        fn advance(&self, uj: u64) {
            use std::sync::atomic::Ordering;
            let v = self.value.load(Ordering::SeqCst) + uj;
            self.value.store(
                if v > self.max { v - self.max } else { v },
                Ordering::SeqCst,
            );
        }
    }

    /// A fake tree with one package whose `energy_uj` comes from memory.
    fn memory_zone(root: &Path, max: u64) -> (FakeCounter, SysfsReader) {
        zone(root, "intel-rapl:0", "package-0", 0, max);
        let value = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let v = value.clone();
        let reader: SysfsReader = Arc::new(move |p: &Path| {
            if p.ends_with("energy_uj") {
                Ok(format!("{}\n", v.load(std::sync::atomic::Ordering::SeqCst)))
            } else {
                fs::read_to_string(p)
            }
        });
        (FakeCounter { value, max }, reader)
    }

    #[test]
    fn five_wraps_in_one_window_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let max = 1_000_000;
        let (counter, reader) = memory_zone(dir.path(), max);
        let m = RaplMeter::open_manual(dir.path(), reader).unwrap();
        assert!(!m.is_sampling());
        let start = m.read().unwrap();
        // 17 steps of 0.3 J on a 1 J counter: 5.1 J, five wraps, each seen by a sample.
        for _ in 0..17 {
            counter.advance(300_000);
            m.sample_now().unwrap();
        }
        let end = m.read().unwrap();
        let d = m.delta(&start, &end);
        assert_eq!(d.components.len(), 1);
        assert_eq!(d.components[0].joules, 5.1);
        assert!(
            d.notes.iter().any(|n| n.contains("wrapped 5 time(s)")),
            "{:?}",
            d.notes
        );
        // The ends alone (what a start/end reader sees) would give 0.1 J.
        assert_eq!(
            wrapped_delta_uj(
                0,
                counter.value.load(std::sync::atomic::Ordering::SeqCst),
                Some(max)
            ),
            Some(100_000)
        );
        // A nested window inside the same totals is exact too.
        let inner_start = m.read().unwrap();
        counter.advance(950_000);
        m.sample_now().unwrap();
        counter.advance(950_000);
        let inner = m.delta(&inner_start, &m.read().unwrap());
        assert_eq!(inner.components[0].joules, 1.9);
        assert_eq!(
            m.delta(&start, &m.read().unwrap()).components[0].joules,
            7.0
        );
    }

    #[test]
    fn unknown_range_backward_step_counts_zero_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        zone(r, "intel-rapl:0", "package-0", 5_000_000, MAX);
        fs::remove_file(r.join("intel-rapl:0/max_energy_range_uj")).unwrap();
        let m = open(r);
        assert!(m
            .notes()
            .iter()
            .any(|n| n.contains("max_energy_range_uj unreadable")));
        assert_eq!(m.sampling_period(), MAX_PERIOD);
        let d = window(&m, r, &[("intel-rapl:0", 1_000_000)]);
        assert_eq!(d.components[0].joules, 0.0);
        assert!(d
            .notes
            .iter()
            .any(|n| n.contains("went backwards 1 time(s)")));
    }

    #[test]
    fn period_keeps_every_counter_from_wrapping_twice() {
        // 262 kJ at 500 W wraps in 524 s: capped at 10 s.
        assert_eq!(sampling_period(&[(Some(MAX), MAX_PACKAGE_W)]), MAX_PERIOD);
        // 2 kJ at 500 W wraps in 4 s: sampled every 2 s.
        assert_eq!(
            sampling_period(&[(Some(MAX), 500.0), (Some(2_000_000_000), 500.0)]),
            Duration::from_secs(2)
        );
        // A 1 J range would need 1 ms: floored at 0.1 s.
        assert_eq!(sampling_period(&[(Some(1_000_000), 500.0)]), MIN_PERIOD);
        assert_eq!(sampling_period(&[(None, 500.0)]), MAX_PERIOD);
        assert_eq!(sampling_period(&[]), MAX_PERIOD);
    }

    #[test]
    fn background_sampler_runs_and_stops_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (counter, reader) = memory_zone(dir.path(), MAX);
        let m = RaplMeter::open_with_reader(dir.path(), reader).unwrap();
        assert!(m.is_sampling());
        assert_eq!(m.sampling_period(), MAX_PERIOD);
        assert!(
            m.describe().contains("sampled every 10.0 s"),
            "{}",
            m.describe()
        );
        assert_eq!(m.details().sampling_period_s, Some(10.0));
        let s = m.read().unwrap();
        counter.advance(2_000_000);
        assert_eq!(m.delta(&s, &m.read().unwrap()).components[0].joules, 2.0);
        // The reader (held by the meter and its thread) is released only once the thread
        // has been joined.
        assert!(Arc::strong_count(&counter.value) > 1);
        drop(m);
        assert_eq!(Arc::strong_count(&counter.value), 1);
    }
}
