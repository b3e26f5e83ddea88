//! Facts about the machine a run happens on, from `/proc` (Linux; `None` elsewhere).

use std::collections::BTreeMap;

/// The CPU model name (`model name` on x86, `Model`/`Processor` on ARM) from `/proc/cpuinfo`.
pub fn cpu_model() -> Option<String> {
    cpu_model_in(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// The first non-empty `model name`, `Model` or `Processor` value of a `/proc/cpuinfo` text.
pub fn cpu_model_in(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        let (k, v) = (k.trim(), v.trim());
        (matches!(k, "model name" | "Model" | "Processor") && !v.is_empty()).then(|| v.to_string())
    })
}

/// Total memory in bytes (`MemTotal` of `/proc/meminfo`).
pub fn mem_total_bytes() -> Option<u64> {
    meminfo_bytes("MemTotal")
}

/// Memory available for new work in bytes (`MemAvailable` of `/proc/meminfo`).
pub fn mem_available_bytes() -> Option<u64> {
    meminfo_bytes("MemAvailable")
}

fn meminfo_bytes(key: &str) -> Option<u64> {
    meminfo_field(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

/// A `/proc/meminfo` field (given in KiB there) in bytes.
fn meminfo_field(meminfo: &str, key: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find(|l| l.split_once(':').is_some_and(|(k, _)| k == key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The machine as run manifests record it: `os`, `arch`, `cpus` (available parallelism),
/// `cpu` (model name, where known) and `memory` (total, "{:.1} GiB", where known).
pub fn describe() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("os".into(), std::env::consts::OS.into());
    m.insert("arch".into(), std::env::consts::ARCH.into());
    m.insert(
        "cpus".into(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .to_string(),
    );
    if let Some(cpu) = cpu_model() {
        m.insert("cpu".into(), cpu);
    }
    if let Some(bytes) = mem_total_bytes() {
        m.insert("memory".into(), format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_model() {
        let x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 49\nmodel name\t: AMD EPYC 7B12\n";
        assert_eq!(cpu_model_in(x86).as_deref(), Some("AMD EPYC 7B12"));
        let arm = "processor\t: 0\nBogoMIPS\t: 108.00\n\nModel\t\t: Raspberry Pi 4 Model B\n";
        assert_eq!(cpu_model_in(arm).as_deref(), Some("Raspberry Pi 4 Model B"));
        assert_eq!(cpu_model_in("model name\t:\nprocessor\t: 0\n"), None);
    }

    #[test]
    fn meminfo_fields_in_bytes() {
        let text = "MemTotal:       16316412 kB\nMemFree:         1000 kB\nMemAvailable:   8000000 kB\n";
        assert_eq!(meminfo_field(text, "MemTotal"), Some(16_316_412 * 1024));
        assert_eq!(meminfo_field(text, "MemAvailable"), Some(8_000_000 * 1024));
        assert_eq!(meminfo_field(text, "Mem"), None);
    }

    #[test]
    fn describe_has_the_manifest_keys() {
        let m = describe();
        for k in ["os", "arch", "cpus"] {
            assert!(m.contains_key(k), "{k}");
        }
        if let Some(mem) = m.get("memory") {
            assert!(mem.ends_with(" GiB"), "{mem}");
        }
    }
}
