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
//! - counters wrap at `max_energy_range_uj`;
//! - an unreadable `energy_uj` (root-only since the 2020 PLATYPUS mitigation) makes the meter
//!   unavailable with that reason, instead of a silent zero.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A RAPL reader over a fixed set of de-duplicated zones.
pub struct RaplMeter {
    zones: Vec<(Zone, Component, String)>,
    reader: SysfsReader,
    notes: Vec<String>,
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

    pub fn open_with_reader(root: &Path, reader: SysfsReader) -> Result<RaplMeter, String> {
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

        // Readability, now rather than at the first window.
        for (z, _, _) in &chosen {
            match reader(&z.energy_path) {
                Ok(s) if parse_u64(&s).is_some() => {}
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
        Ok(RaplMeter {
            zones: chosen,
            reader,
            notes,
        })
    }

    pub fn has_dram(&self) -> bool {
        self.zones.iter().any(|(_, c, _)| *c == Component::Ram)
    }

    /// Notes from discovery (duplicates dropped, psys skipped).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Labels of the zones that are counted.
    pub fn zone_labels(&self) -> Vec<String> {
        self.zones.iter().map(|(_, _, l)| l.clone()).collect()
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

impl EnergyMeter for RaplMeter {
    fn name(&self) -> &'static str {
        "rapl"
    }

    fn describe(&self) -> String {
        let zones: Vec<String> = self
            .zones
            .iter()
            .map(|(z, _, l)| format!("{l} [{}]", z.id))
            .collect();
        format!("RAPL energy counters: {}", zones.join(", "))
    }

    fn read(&self) -> Result<Snapshot, EnergyError> {
        let mut values = Vec::with_capacity(self.zones.len());
        for (z, _, _) in &self.zones {
            let s = (self.reader)(&z.energy_path).map_err(|e| {
                if e.kind() == io::ErrorKind::PermissionDenied {
                    EnergyError::Read(permission_hint(&z.energy_path))
                } else {
                    EnergyError::Read(format!("{}: {e}", z.energy_path.display()))
                }
            })?;
            let v = parse_u64(&s).ok_or_else(|| EnergyError::Format {
                path: z.energy_path.clone(),
                message: format!("not a counter value: {:?}", s.trim()),
            })?;
            values.push(v as f64);
        }
        Ok(Snapshot::new(values))
    }

    fn delta(&self, start: &Snapshot, end: &Snapshot) -> Delta {
        let mut notes = Vec::new();
        let mut components: Vec<ComponentEnergy> = Vec::new();
        let mut package_readings: Vec<(u64, u64, String)> = Vec::new();
        for (i, (z, component, label)) in self.zones.iter().enumerate() {
            let (s, e) = (start.values[i] as u64, end.values[i] as u64);
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
            let uj = match wrapped_delta_uj(s, e, z.max_range_uj) {
                Some(d) => {
                    if e < s {
                        notes.push(format!("RAPL {label}: counter wrapped during the window (corrected with max_energy_range_uj)"));
                    }
                    d
                }
                None => {
                    notes.push(format!(
                        "RAPL {label}: counter went backwards ({s} -> {e} uJ) and its range is unknown; counted as 0"
                    ));
                    0
                }
            };
            components.push(ComponentEnergy {
                component: *component,
                label: label.clone(),
                method: Method::MeasuredRapl,
                joules: uj as f64 / 1e6,
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

    #[test]
    fn package_and_dram_without_double_counting() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        zone(r, "intel-rapl:0", "package-0", 1_000_000, MAX);
        zone(r, "intel-rapl:0:0", "core", 500_000, MAX);
        zone(r, "intel-rapl:0:1", "uncore", 100_000, MAX);
        zone(r, "intel-rapl:0:2", "dram", 2_000_000, MAX);
        zone(r, "intel-rapl:1", "psys", 9_000_000, MAX);
        let m = RaplMeter::open(r).unwrap();
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
        let m = RaplMeter::open(r).unwrap();
        assert_eq!(m.zone_labels(), ["psys (platform)"]);
        assert!(!m.has_dram());
    }

    #[test]
    fn counter_wrap_uses_max_energy_range() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        zone(r, "intel-rapl:0", "package-0", MAX - 1_000_000, MAX);
        let m = RaplMeter::open(r).unwrap();
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
        let m = RaplMeter::open(r).unwrap();
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
        let m = RaplMeter::open(r).unwrap();
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
        let m = RaplMeter::open(dir.path()).unwrap();
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
}
