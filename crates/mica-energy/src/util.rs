//! Small helpers: CSV line splitting, run ids, host facts.

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

/// A random UUID v4 for the CSV `run_id` column.
pub(crate) fn run_id() -> String {
    uuid::Uuid::new_v4().to_string()
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
    info.mem_total_gb = mica_core::machine::mem_total_bytes()
        .map(|b| b as f64 / (1024.0 * 1024.0 * 1024.0));
    info
}

pub(crate) fn parse_cpuinfo(text: &str) -> HostInfo {
    let mut ids = std::collections::BTreeSet::new();
    let mut hypervisor = false;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "physical id" => {
                ids.insert(v.to_string());
            }
            "flags" if v.split_whitespace().any(|f| f == "hypervisor") => hypervisor = true,
            _ => {}
        }
    }
    HostInfo {
        cpu_model: mica_core::machine::cpu_model_in(text),
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
