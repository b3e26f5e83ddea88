//! Small helpers: CSV fields, /proc parsing, timestamps. No crate is worth a dependency here.

use std::time::{SystemTime, UNIX_EPOCH};

/// Splits one CSV line into fields, honouring double quotes (RFC 4180, no embedded newlines).
pub(crate) fn split_csv_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => out.push(std::mem::take(&mut field)),
            (_, c) => field.push(c),
        }
    }
    out.push(field);
    out
}

/// Quotes a CSV field when it needs it.
pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC (CodeCarbon writes an ISO timestamp without a zone; mica
/// states UTC so rows from different machines sort correctly).
pub(crate) fn iso_utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A random-looking UUID-v4-shaped id for the CSV `run_id` column; unique enough for rows of
/// one machine (time, pid and a counter are mixed through SplitMix64).
pub(crate) fn run_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x =
        nanos ^ ((std::process::id() as u64) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let a = next();
    let b = next();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// Facts from `/proc/cpuinfo` and `/proc/meminfo` that the estimate and the CSV need.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostInfo {
    pub cpu_model: Option<String>,
    pub sockets: usize,
    pub hypervisor: bool,
    pub mem_total_gb: Option<f64>,
}

pub(crate) fn host_info() -> HostInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut info = parse_cpuinfo(&cpuinfo);
    info.mem_total_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib * 1024.0 / (1024.0 * 1024.0 * 1024.0));
    info
}

pub(crate) fn parse_cpuinfo(text: &str) -> HostInfo {
    let mut model = None;
    let mut ids = std::collections::BTreeSet::new();
    let mut hypervisor = false;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "model name" | "Model" | "Processor" if model.is_none() && !v.is_empty() => {
                model = Some(v.to_string())
            }
            "physical id" => {
                ids.insert(v.to_string());
            }
            "flags" if v.split_whitespace().any(|f| f == "hypervisor") => hypervisor = true,
            _ => {}
        }
    }
    HostInfo {
        cpu_model: model,
        sockets: ids.len().max(1),
        hypervisor,
        mem_total_gb: None,
    }
}

/// Logical CPUs online, as `psutil.cpu_count()` (which CodeCarbon divides by) reports them.
pub(crate) fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn csv_split_handles_quotes_and_commas() {
        assert_eq!(
            split_csv_line(r#""Intel EP80579 Integrated, 1066 MHz",18.0"#),
            ["Intel EP80579 Integrated, 1066 MHz", "18.0"]
        );
        assert_eq!(
            split_csv_line(r#"a,"b ""c""",,d"#),
            ["a", r#"b "c""#, "", "d"]
        );
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn iso_timestamps() {
        assert_eq!(iso_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            iso_utc(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29T23:59:59Z"
        );
    }

    #[test]
    fn run_ids_differ_and_look_like_uuids() {
        let (a, b) = (run_id(), run_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[test]
    fn cpuinfo_parsing() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC\nphysical id\t: 0\nflags\t\t: fpu hypervisor avx2\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\nphysical id\t: 0\n";
        let h = parse_cpuinfo(text);
        assert_eq!(h.cpu_model.as_deref(), Some("AMD EPYC"));
        assert_eq!(h.sockets, 1);
        assert!(h.hypervisor);
        let two = "model name: X\nphysical id: 0\nphysical id: 1\n";
        assert_eq!(parse_cpuinfo(two).sockets, 2);
    }
}
